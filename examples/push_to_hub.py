"""Share a pruned checkpoint on the Hugging Face Hub and fetch it back: what `linearpatch push` and `linearpatch pull`
do, from Python.

    python examples/push_to_hub.py CHECKPOINT my-org/my-model-linearpatch [--private]

It shows:

1. `validate_folder`: the checks a push makes first (config, weights, remote-code files, report);
2. `push_to_hub`: the model card written from the checkpoint's report (and its `linearpatch eval` table when there
   is one), everything pushed in one commit;
3. `pull`: download, verify every file against the Hub's hashes, load, and summarise.

Log in first (`hf auth login`, or set `HF_TOKEN`). `HF_ENDPOINT` points it at another Hub server, as the tests do.
"""

import argparse

from linearpatch.hub_tools import pull, push_to_hub, validate_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a LinearPatch checkpoint folder (or a patch adapter folder)")
    parser.add_argument("repo_id", help="org/name on the Hub")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()

    info = validate_folder(args.checkpoint)
    print(f"valid: a LinearPatch {info.kind} of {len(info.files)} files")
    url = push_to_hub(args.checkpoint, args.repo_id, private=args.private)
    print(f"pushed: {url}")
    summary = pull(args.repo_id)
    print(summary)


if __name__ == "__main__":
    main()
