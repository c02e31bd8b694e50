"""Task data: the user's files or hub datasets read as they are, or lmkit's seeded generators.

Every example is `{"task", "input", "target"}` (plus `choices` when the labels are known). Methods
write the examples they used next to their outputs, so anyone can see what a model saw.
"""

from lmkit.data import reviews  # noqa: F401  (registers the reviews_* generated tasks)
from lmkit.data.generated import TASKS, Example, GeneratedData, generate_examples, register_task
from lmkit.data.load import load_data, read_source
from lmkit.data.sources import DataError
from lmkit.data.spec import Columns, DataSpec, EvalSplit, SourceSpec, TaskSource

__all__ = [
    "TASKS",
    "Columns",
    "DataError",
    "DataSpec",
    "EvalSplit",
    "Example",
    "GeneratedData",
    "SourceSpec",
    "TaskSource",
    "generate_examples",
    "load_data",
    "read_source",
    "register_task",
]
