"""What a job is and what it produces: the spec, the Qwen catalog, the result and manifest models, the errors."""

from qwen_batch.schemas.catalog import CATALOG, ModelVariant, get_variant
from qwen_batch.schemas.errors import RowError, SpecError
from qwen_batch.schemas.results import RESULT_SCHEMA, CommitRecord, JobManifest, Totals
from qwen_batch.schemas.spec import JobSpec, load_spec

__all__ = ["CATALOG", "RESULT_SCHEMA", "CommitRecord", "JobManifest", "JobSpec", "ModelVariant", "RowError",
           "SpecError", "Totals", "get_variant", "load_spec"]
