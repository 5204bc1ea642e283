import sys
import exotic  # registers
import fuzz
sys.argv = ["fuzz.py"] + sys.argv[1:]
start, count = int(sys.argv[1]), int(sys.argv[2])
bad = skipped = 0
for seed in range(start, start + count):
    try:
        names, problems = fuzz.run_case(seed, full=True)
    except Exception as e:
        print(f"seed {seed}: HARNESS {type(e).__name__}: {e}"); continue
    if problems is None:
        skipped += 1; continue
    if problems:
        bad += 1
        print(f"seed {seed}: {names}")
        for p in problems[:5]: print("   ", p)
    sys.stdout.flush()
print(f"done {count} bad {bad} skipped {skipped}")
