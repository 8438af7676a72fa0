"""Offline lm-eval tasks built from installed packages, so the whole evaluation flow runs without the Hub.

- `wiki_next_sentence`: given two sentences of a held-out Wikipedia article (never used for calibration or
  distillation), pick the true next sentence among four (the others are drawn from other held-out articles).
- `mmlu_dev_offline`: the MMLU dev questions that ship inside lm-eval's own chain-of-thought prompt file, asked as
  plain 4-way multiple choice (answer letter).
- `wiki_last_word`: LAMBADA-style, predict the last word of a passage of held-out Wikipedia or news text (greedy: the
  word's every token must be the argmax). The word ends a sentence and already occurs in the passage, as LAMBADA's
  words mostly do, so context decides it and a small model scores well above its chance of 0.

Users with Hub access pass the paper's task names instead (arc_easy, arc_challenge, boolq, hellaswag, piqa,
winogrande, wsc273, race, copa, mmlu).
"""

import functools
import json
import os
import random
import re
from pathlib import Path

from linearpatch.common.errors import LinearPatchError
from linearpatch.common.files import write_files_atomically

from ..data import bos_token_of, load_texts
from ..models import cache_dir

OFFLINE_TASKS = ("wiki_next_sentence", "mmlu_dev_offline", "wiki_last_word")
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande", "wsc273", "race", "copa")
TASKS_VERSION = 2
# The accuracy of guessing, per task (1 / choices; 0 for free prediction), to flag tasks a model does not solve at all.
CHANCE_ACCURACY = {
    "wiki_next_sentence": 0.25,
    "mmlu_dev_offline": 0.25,
    "wiki_last_word": 0.0,
    "arc_challenge": 0.25,
    "arc_easy": 0.25,
    "boolq": 0.5,
    "hellaswag": 0.25,
    "piqa": 0.5,
    "winogrande": 0.5,
    "wsc273": 0.5,
    "race": 0.25,
    "copa": 0.5,
    "mmlu": 0.25,
    "lambada_openai": 0.0,
}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

_MULTIPLE_CHOICE_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: "{delimiter}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

_LAST_WORD_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""
_WORD = re.compile(r"^[A-Za-z]{4,}$")
# Words a passage ends on for grammar's sake, not its content ("..., he said."): they would make the task about style.
_FILLER_WORDS = {"said", "says", "told", "today", "there", "this", "that", "them", "they", "then", "also", "year"}


def _sentences(article: str) -> list[str]:
    body = " ".join(article.split("\n")[1:])  # drop the title line
    # Keep prose sentences: list items, headings and table/template residue make the task about markup.
    return [
        s.strip()
        for s in _SENTENCE_END.split(body)
        if 40 <= len(s.strip()) <= 300 and not any(mark in s for mark in "*=|{}[]")
    ]


def next_sentence_documents(num_documents: int = 500, seed: int = 0) -> list[dict]:
    """Multiple-choice documents from the held-out Wikipedia articles (see module docstring)."""
    rng = random.Random(seed)
    articles = [_sentences(article) for article in load_texts("wikipedia-eval")]
    articles = [sentences for sentences in articles if len(sentences) >= 4]
    documents = []
    per_article = max(1, num_documents // len(articles) + 1)
    for index, sentences in enumerate(articles):
        others = [s for j, other in enumerate(articles) if j != index for s in other]
        starts = rng.sample(range(len(sentences) - 2), min(per_article, len(sentences) - 2))
        for start in starts:
            choices = rng.sample(others, 3) + [sentences[start + 2]]
            rng.shuffle(choices)
            documents.append(
                dict(
                    context=f"{sentences[start]} {sentences[start + 1]}",
                    choices=choices,
                    label=choices.index(sentences[start + 2]),
                )
            )
    rng.shuffle(documents)
    return documents[:num_documents]


def last_word_documents(num_documents: int = 500, seed: int = 0, context_words: int = 120) -> list[dict]:
    """LAMBADA-style documents (see module docstring) from the held-out Wikipedia articles and the news corpus:
    `context` (up to `context_words` words before the target) and `target` (a space and the word)."""
    rng = random.Random(seed)
    documents = []
    for corpus in ("wikipedia-eval", "lee-news"):
        for text in load_texts(corpus):
            words = text.split()
            found = []
            for index in range(40, len(words)):
                word = words[index]
                if not word.endswith(".") or not _WORD.match(word[:-1]) or word[:-1].lower() in _FILLER_WORDS:
                    continue
                before = words[max(0, index - context_words) : index]
                if word[:-1].lower() in {w.strip(".,;:!?\"'()").lower() for w in before}:
                    found.append(dict(context=" ".join(before), target=" " + word[:-1]))
            documents.extend(rng.sample(found, min(len(found), 3)))  # a few per text: no text dominates
    rng.shuffle(documents)
    return documents[:num_documents]


def chance_accuracy(task: str) -> float | None:
    """The accuracy of guessing on `task`, if known."""
    return CHANCE_ACCURACY.get(task)


def mmlu_dev_documents() -> list[dict]:
    """The MMLU dev questions from lm-eval's `flan_cot_fewshot/_cot_prompts.json`, as 4-way multiple choice."""
    import lm_eval

    prompts = json.loads((Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json").read_text())
    options = re.compile(r"\(A\) (.+?) \(B\) (.+?) \(C\) (.+?) \(D\) (.+)$", re.S)
    documents = []
    for subject, text in sorted(prompts.items()):
        for block in text.split("\n\nQ: ")[1:]:
            question_and_options, _, answer = block.partition("\nA: ")
            question, _, option_text = question_and_options.rpartition("\n")
            found, letter = options.search(option_text), re.search(r"answer is \(([ABCD])\)", answer)
            if not (found and letter and question.strip()):
                continue
            choices = [choice.strip() for choice in found.groups()]
            lines = [f"{'ABCD'[i]}. {choice}" for i, choice in enumerate(choices)]
            context = f"Subject: {subject.replace('_', ' ')}\n{question.strip()}\n" + "\n".join(lines) + "\nAnswer:"
            documents.append(dict(context=context, choices=["A", "B", "C", "D"], label="ABCD".index(letter[1])))
    return documents


def build_offline_tasks(directory: str | Path | None = None, num_documents: int = 500) -> Path:
    """Write the offline tasks' JSONL data and lm-eval YAMLs to `directory` (default: the linearpatch cache) and
    return it, for `--include_path` / `TaskManager(include_path=...)`. Built once, reused after."""
    directory = Path(directory) if directory else cache_dir() / f"lm_eval_tasks-v{TASKS_VERSION}-{num_documents}"
    if all((directory / f"{task}.yaml").exists() for task in OFFLINE_TASKS):
        return directory
    builders = {
        "wiki_next_sentence": (lambda: next_sentence_documents(num_documents), _MULTIPLE_CHOICE_YAML),
        "mmlu_dev_offline": (mmlu_dev_documents, _MULTIPLE_CHOICE_YAML),
        "wiki_last_word": (lambda: last_word_documents(num_documents), _LAST_WORD_YAML),
    }
    files = {}
    for task, (build, template) in builders.items():
        files[f"{task}.jsonl"] = "".join(json.dumps(document) + "\n" for document in build())
        data = directory / f"{task}.jsonl"
        files[f"{task}.yaml"] = template.format(task=task, data=data, delimiter=" ", version=TASKS_VERSION)
    # Each file through a temporary one and a rename, data before YAML: a half-built task is never picked up.
    write_files_atomically(directory, files, overwrite=True)
    return directory


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """An lm-eval `TaskManager` that knows `tasks`: the offline ones (built on first use) and, for any other name,
    lm-eval's own registry. Built once per task list and reused (indexing lm-eval's registry takes seconds, and
    `linearpatch eval` needs it for the check and then for every model).

    Raises:
        LinearPatchError: for a task name neither knows, before any model is loaded.
    """
    return _task_manager(tuple(tasks), str(include_path) if include_path else None)


@functools.lru_cache(maxsize=8)
def _task_manager(tasks: tuple[str, ...], include_path: str | None):
    from lm_eval.tasks import TaskManager

    offline = [task for task in tasks if task in OFFLINE_TASKS]
    include = str(include_path) if include_path else (str(build_offline_tasks()) if offline else None)
    manager = TaskManager(include_path=include, include_defaults=len(offline) < len(tasks))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise LinearPatchError(
            f"Unknown lm-eval task(s) {', '.join(unknown)}: use the offline tasks ({', '.join(OFFLINE_TASKS)}) or "
            f"lm-eval task names such as {', '.join(PAPER_TASKS[:4])} (those need Hub access)."
        )
    return manager


# lm-eval estimates the standard error of a perplexity metric (wiki_last_word's) by resampling the per-document scores:
# 100000 times by default, in a fork pool of one process per core. Forking a process whose torch and tokenizer threads
# are running can leave a child stuck on a lock it inherited held, and the pool's shutdown waiting on it forever (CI's
# `linearpatch eval` hung 20 minutes, twice; reproduced here: the worker on a futex, the parent in waitpid). So the
# resampling stays in this process; 1000 resamples give the standard error to about 2%.
BOOTSTRAP_ITERS = 1000


def lm_eval_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run lm-eval on an in-memory model; return `{task: {"acc": .., "acc_stderr": .., "acc_norm": .., ...}}`.

    Offline tasks (see `OFFLINE_TASKS`) are built on first use; other names are lm-eval's own tasks (they
    download their data from the Hub). Nothing is forked: bootstrapped standard errors use `BOOTSTRAP_ITERS`
    resamples in this process.
    """
    from unittest import mock

    import lm_eval.evaluator
    import lm_eval.loggers.utils
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(tasks, include_path)
    device = str(next(model.parameters()).device)
    # Every request starts as the model's tokenizer starts a sequence (BOS for Gemma, Llama 3, Mistral), said
    # explicitly rather than left to lm-eval's per-family guesses.
    add_bos = bos_token_of(tokenizer) is not None
    wrapped = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        device=device,
        batch_size=batch_size,
        add_bos_token=add_bos,
    )
    # lm-eval records the git commit of the current directory by running `git describe`, which prints "fatal: not a
    # git repository" outside one; that commit says nothing about the models evaluated here.
    no_git = lambda: None  # noqa: E731
    with (
        mock.patch.object(lm_eval.loggers.utils, "get_git_commit_hash", no_git),
        mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", no_git),
        mock.patch.dict(os.environ, {"DISABLE_MULTIPROC": "1"}),  # lm-eval's switch to resample without a pool
    ):
        results = simple_evaluate(
            model=wrapped,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            log_samples=False,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    scores = {}
    for task, values in results["results"].items():
        scores[task] = {
            key.split(",")[0]: float(value)
            for key, value in values.items()
            if "," in key and isinstance(value, int | float)
        }
    return scores


__all__ = [
    "BOOTSTRAP_ITERS",
    "OFFLINE_TASKS",
    "task_manager",
    "PAPER_TASKS",
    "CHANCE_ACCURACY",
    "build_offline_tasks",
    "chance_accuracy",
    "lm_eval_tasks",
    "last_word_documents",
    "mmlu_dev_documents",
    "next_sentence_documents",
]
