"""transformers' own common model tests (ModelTesterMixin, from transformers' source distribution; `make setup`
fetches them with tests/fetch_transformers_tests.py) over the LinearPatch classes (base model and causal LM) of every
family (issue #23).

The default run covers Llama and Gemma 3 with a gap in the middle; `pytest -m exhaustive` covers all five families
with nothing pruned, a gap in the middle and a gap that reaches the end. The tests that fail by design are listed in
`DESIGNED_FAILURES` with the reason (and in the README's checkpoint-format section); each is expected to fail.

transformers' `tests/causal_lm_tester.py` is not in the source distribution; `LinearPatchModelTester` below plays its
part: it builds a tiny config of the family, pruned, and the inputs the common tests feed it.
"""

import sys
import unittest
from pathlib import Path

import pytest
import torch
from helpers import FAMILY_OVERRIDES

from linearpatch.modeling import FAMILIES, pruned_config

COMMON = Path(sys.prefix) / "transformers-tests"
if not (COMMON / "transformers_tests" / "test_modeling_common.py").is_file():
    pytest.fail(f"transformers' common tests are not in {COMMON}: run `make setup`.", pytrace=False)
sys.path.insert(0, str(COMMON))
from transformers_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402

# (dense layers, pruned layers): transformers' tests want at most two layers left.
GAPS = {"NothingPruned": (2, []), "MiddleGap": (4, [1, 2]), "EndGap": (4, [2, 3])}
IN_THE_DEFAULT_RUN = {("llama", "MiddleGap"), ("gemma3_text", "MiddleGap")}
# Common tests that fail by design, and why (README, "The checkpoint format").
DESIGNED_FAILURES = {
    "test_model_weights_reload_no_missing_tied_weights": "loads a checkpoint with weights missing and expects them "
    "reported and initialised at random; a LinearPatch checkpoint refuses that (silent corruption) unless "
    "`allow_missing_weights=True`",
    "test_generation_tester_mixin_inheritance": "asks that the test class inherit transformers' generation tests, "
    "which its source distribution does not ship (test_checkpoint_format.py and test_families.py test cached and "
    "uncached greedy generation of every family instead)",
}


class LinearPatchModelTester:
    """What ModelTesterMixin asks of a model tester, for a tiny pruned model of one family."""

    batch_size = 2
    seq_length = 7
    is_training = True
    vocab_size = 99
    hidden_size = 32
    num_attention_heads = 4

    def __init__(self, parent, family: str, dense_layers: int, pruned_layers: list[int]):
        self.parent = parent
        self.family = family
        self.dense_layers = dense_layers
        self.pruned_layers = pruned_layers
        self.num_hidden_layers = dense_layers - len(pruned_layers)

    def get_config(self):
        values = dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=37,
            num_hidden_layers=self.dense_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=2,
            head_dim=self.hidden_size // self.num_attention_heads,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        values.update(FAMILY_OVERRIDES[self.family])
        if self.family == "gemma3_text":
            values["query_pre_attn_scalar"] = values["head_dim"]
            values["layer_types"] = ["sliding_attention", "full_attention"] * (self.dense_layers // 2)
        family = FAMILIES[self.family]
        dense = family.dense_config_class(**values)
        if self.pruned_layers:
            return pruned_config(dense, self.pruned_layers)
        # Nothing pruned: the LinearPatch classes must behave as the family's own.
        values = {k: v for k, v in dense.to_dict().items() if k not in ("model_type", "architectures")}
        return family.config_class(
            **values, original_num_hidden_layers=self.dense_layers, pruned_layers=[], patch_positions=[]
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = random_attention_mask([self.batch_size, self.seq_length])
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(scope="module", autouse=True)
def classes_known_to_transformers_tables():
    """The common tests look model classes up in transformers' tables by name: a base model (no head, no loss) is
    skipped by the training checks, a causal LM is given labels. The LinearPatch classes are registered with the auto
    classes, not in those tables: they are added for the length of this module."""
    from transformers.models.auto import modeling_auto

    tables = [
        (modeling_auto.MODEL_MAPPING_NAMES, "model_class"),
        (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal_lm_class"),
    ]
    added = []
    for table, attribute in tables:
        for family in FAMILIES.values():
            if family.model_type not in table:
                table[family.model_type] = getattr(family, attribute).__name__
                added.append((table, family.model_type))
    yield
    for table, model_type in added:
        table.pop(model_type)


def _test_class(family: str, gap: str):
    def setUp(self):  # noqa: N802 - unittest's name
        torch.manual_seed(0)
        self.model_tester = LinearPatchModelTester(self, family, *GAPS[gap])

    attributes = dict(
        all_model_classes=(FAMILIES[family].model_class, FAMILIES[family].causal_lm_class),
        setUp=setUp,
        __module__=__name__,
    )
    if (family, gap) not in IN_THE_DEFAULT_RUN:
        attributes["pytestmark"] = [pytest.mark.exhaustive]
    name = "Test" + "".join(part.capitalize() for part in family.split("_")) + gap
    test_class = type(name, (ModelTesterMixin, unittest.TestCase), attributes)
    for test_name in DESIGNED_FAILURES:
        if hasattr(test_class, test_name):
            setattr(test_class, test_name, unittest.expectedFailure(getattr(test_class, test_name)))
    return name, test_class


for _family in FAMILY_OVERRIDES:
    for _gap in GAPS:
        _name, _class = _test_class(_family, _gap)
        globals()[_name] = _class
