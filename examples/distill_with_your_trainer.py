"""Train the patch of a pruned checkpoint with your own `transformers.Trainer` and your own text: the patch is a
PEFT adapter, the only trainable parameter, saved small and merged back.

    python examples/distill_with_your_trainer.py CHECKPOINT --text my.txt [--output patch-adapter] [--max-steps 50]

It shows:

1. `get_patch_peft_model`: the pruned model wrapped so that only its patch matrices train (a few hundred thousand
   parameters of a hundred million);
2. a plain `Trainer` with next-token cross-entropy on your text, tokenized and cut into blocks by `datasets` (here
   the loss is the language-modelling one; `linearpatch distill` trains the same adapter against the dense model's
   top-K logits instead);
3. `save_patch_adapter`: the adapter alone, recording the checkpoint it belongs to (stock PEFT loads it too);
4. `merge_and_unload`: a plain LinearPatch checkpoint again, saved with `save_checkpoint`.

`--text` is a `.txt` file (one document per blank-line-separated paragraph); without it, the embedded Lee news
corpus stands in for your text.
"""

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import linearpatch
from linearpatch.integration.data import load_texts
from linearpatch.integration.distillation import get_patch_peft_model, save_patch_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a LinearPatch checkpoint folder (from `linearpatch prune`)")
    parser.add_argument("--text", help="your training text (.txt); default: the embedded Lee news corpus")
    parser.add_argument("--output", default="patch-adapter", help="the adapter folder to write")
    parser.add_argument("--merged", default="patched-merged", help="the merged checkpoint folder to write")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    args = parser.parse_args()

    model, tokenizer = linearpatch.load_model(args.checkpoint)
    if args.text:
        documents = [part for part in Path(args.text).read_text().split("\n\n") if part.strip()]
    else:
        documents = load_texts("lee-news")

    # Your data, the usual way: tokenize, then cut the token stream into blocks of `--block-size`.
    def blocks(batch):
        ids = [token for text in batch["text"] for token in tokenizer(text)["input_ids"]]
        usable = len(ids) - len(ids) % args.block_size
        return {"input_ids": [ids[i : i + args.block_size] for i in range(0, usable, args.block_size)]}

    dataset = Dataset.from_dict({"text": documents}).map(blocks, batched=True, remove_columns=["text"])

    peft_model = get_patch_peft_model(model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    print(f"training {trainable:,} of {total:,} parameters (the patches) on {len(dataset)} blocks")

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    trainer = Trainer(
        model=peft_model,
        args=TrainingArguments(
            output_dir=f"{args.output}-runs",
            max_steps=args.max_steps,
            per_device_train_batch_size=1,
            learning_rate=3e-4,
            logging_steps=max(1, args.max_steps // 5),
            save_strategy="no",
            report_to=[],
        ),
        train_dataset=dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    history = trainer.train()
    print(f"mean training loss {history.training_loss:.4f}")

    save_patch_adapter(peft_model, args.output, base=args.checkpoint, overwrite=args.overwrite)
    merged = peft_model.merge_and_unload()
    linearpatch.save_checkpoint(merged, tokenizer, args.merged, overwrite=args.overwrite)
    print(f"adapter: {args.output}; merged checkpoint: {args.merged}")


if __name__ == "__main__":
    main()
