"""Benchmarks: what each stage costs and what it gains, as ratios measured side by side in one run, and the claims
the project makes about them.

    python -m bench [--sections NAME ...]            measure (default: the quick cost sections)
    python -m bench --check [--sections NAME ...]    measure and check every claim (default: every section but the
                                                     opt-in `scale`: `make bench-scale`)
    python -m bench --check --recorded               check the claims on the recorded results, without measuring

Writes bench/results/latest.json and latest.md (sections not rerun keep their recorded results). `--check` exits 1
and names each claim that no longer holds. Sections and their claims live in bench/sections/.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from .harness import Claim
from .sections import CHECKED_SECTIONS, DEFAULT_SECTIONS, SECTIONS

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']} ({results['date']})", ""]
    for name, section in SECTIONS.items():
        if name in results:
            try:
                lines += section.markdown(results[name])
            except (KeyError, TypeError, IndexError):  # recorded by an older bench, in another shape
                lines += [f"**{name}**: recorded by an older bench; `python -m bench --sections {name}` renews it", ""]
    return "\n".join(lines)


def check(results: dict, sections: list[str]) -> list[tuple[str, Claim]]:
    """Every claim of `sections` on `results` (a section without a result, or with one recorded in an older shape,
    is an error, not a pass)."""
    missing = [name for name in sections if name not in results]
    if missing:
        raise SystemExit(f"bench: no recorded result for {', '.join(missing)}: run `python -m bench --sections ...`.")
    judged = []
    for name in sections:
        try:
            judged += [(name, claim) for claim in SECTIONS[name].checks(results[name])]
        except (KeyError, TypeError, IndexError) as error:
            raise SystemExit(
                f"bench: the recorded {name} result has no {error}: it was recorded by an older bench; run "
                f"`python -m bench --sections {name}`."
            ) from None
    return judged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), help="sections to run (see above)")
    parser.add_argument("--check", action="store_true", help="check the claims of the sections; exit 1 if one fails")
    parser.add_argument("--recorded", action="store_true", help="with --check: judge the recorded results, run none")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run; claims are not checked)")
    parser.add_argument("--output", default=str(RESULTS / "latest"), help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    if args.check and args.quick:
        parser.error("--check judges claims stated at the default sizes; --quick runs are smoke runs.")
    if args.recorded and not args.check:
        parser.error("--recorded goes with --check.")
    sections = args.sections or (CHECKED_SECTIONS if args.check else DEFAULT_SECTIONS)
    recorded = Path(args.output + ".json")
    results = json.loads(recorded.read_text()) if recorded.exists() else {}
    if not args.recorded:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        results.update(machine=machine(), date=time.strftime("%Y-%m-%d"), device=device)
        for name in sections:
            print(f"== {name}: {SECTIONS[name].TITLE}", flush=True)
            started = time.perf_counter()
            results[name] = SECTIONS[name].run(device, args.quick)
            print(json.dumps(results[name], indent=1), f"\n({time.perf_counter() - started:.0f} s)", flush=True)
            # Written after every section, so that a long run that stops keeps what it measured.
            recorded.parent.mkdir(parents=True, exist_ok=True)
            recorded.write_text(json.dumps(results, indent=2))
            Path(args.output + ".md").write_text(markdown(results))
        print(markdown(results))
    if not args.check:
        return 0
    judged = check(results, sections)
    for section, claim in judged:
        print(claim.line(section))
    failed = [f"{section}: {claim.name}" for section, claim in judged if not claim.holds]
    if failed:
        print(f"bench --check: {len(failed)} claim(s) no longer hold: " + "; ".join(failed), file=sys.stderr)
        return 1
    print(f"bench --check: all {len(judged)} claims hold ({', '.join(sections)}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
