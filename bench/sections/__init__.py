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
        gguf,
        serving,
        sequential,
        tasks,
    )
}
DEFAULT_SECTIONS = [name for name, module in SECTIONS.items() if module.DEFAULT]
