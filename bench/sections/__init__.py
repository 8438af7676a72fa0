"""The bench's sections, in the order they run and appear in `latest.md`; each module has `run`, `markdown` and
`checks` (see `bench/harness.py`)."""

from . import (
    calibration,
    checkpoint,
    closeness,
    distillation,
    export,
    gguf,
    inference,
    patch_kinds,
    quality,
    real_models,
    scale,
    search,
    sequential,
    serving,
    tasks,
)

SECTIONS = {
    module.__name__.rsplit(".", 1)[-1]: module
    for module in (
        inference,
        calibration,
        distillation,
        checkpoint,
        quality,
        patch_kinds,
        search,
        export,
        closeness,
        real_models,
        gguf,
        serving,
        sequential,
        tasks,
        scale,
    )
}
DEFAULT_SECTIONS = [name for name, module in SECTIONS.items() if module.DEFAULT]
# What `--check` runs when no section is named: all but the opt-in ones (`scale`: an hour and 45 GB of disk).
CHECKED_SECTIONS = [name for name, module in SECTIONS.items() if not getattr(module, "OPT_IN", False)]
