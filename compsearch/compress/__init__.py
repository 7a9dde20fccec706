"""Applying compression plans to models, and storing the result."""
from compsearch.compress.apply import (
    AppliedPlan,
    MatrixLayout,
    StoredMatrix,
    apply_plan_,
    layer_layout,
    layer_nbytes,
    plan_bits_per_weight,
    plan_nbytes,
    stored_layouts,
)
from compsearch.compress.calibration import InputStatistics, input_hessians, input_norms, input_statistics
from compsearch.compress.checkpoint import load_compressed, save_compressed

# Bumped whenever a method's numerics change (2: structured pruning ranks units by output energy and
# corrects the kept columns; 3: GGUF types round with GPTQ's error compensation; 4: GGUF-typed matrices
# multiply inputs rounded as llama.cpp rounds them; 5: SparseGPT chooses an unstructured mask over each
# block of columns, not row by row; 6: GPTQ fits its group scales to the inputs' activity, SparseGPT refits
# the kept weights; 7: K-types search and refit their block scales): measurements made by another version are
# neither reused nor mixed.
COMPRESS_VERSION = 7

__all__ = [
    "COMPRESS_VERSION", "AppliedPlan", "InputStatistics", "MatrixLayout", "StoredMatrix", "apply_plan_", "input_hessians", "input_norms", "input_statistics", "layer_layout", "layer_nbytes",
    "load_compressed", "plan_bits_per_weight", "plan_nbytes", "save_compressed", "stored_layouts",
]
