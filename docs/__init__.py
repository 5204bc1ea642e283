"""The documentation pages (Markdown, doctested by pytest); a package so that its conftest has a
name of its own."""
