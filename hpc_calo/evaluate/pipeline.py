"""One evaluation run: check the request, then compute every requested metric and write the report directory.

The checks need neither torch nor scikit-learn: a bad request is answered at once, before the seconds that
importing them takes.
"""

from __future__ import annotations

from hpc_calo.errors import UserError
from hpc_calo.evaluate.config import EvaluateRequest
from hpc_calo.geometry import get_geometry
from hpc_calo.io import check_file
from hpc_calo.outputs import REPORT_DIR, claim, storage_error


def evaluate(cfg: EvaluateRequest) -> dict[str, object]:
    """Run the evaluation and write REPORT_DIR atomically; return the report dictionary.

    Before anything is computed: the report directory may replace only an earlier report (never an input or
    a directory holding one), and both files pass the same streamed checks as ``io check``.
    """
    geo = get_geometry(cfg.dataset)
    claim(cfg.out, REPORT_DIR, inputs=[cfg.gen, cfg.ref])
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available")
    n = sum(check_file(path, geo).n for path in (cfg.gen, cfg.ref))
    # The low-level classifier's on-disk copy of both files dominates what the report directory needs.
    needed = n * (1 + geo.n_voxels) * 4 if "cls-low" in cfg.metrics else 10 * 2**20
    from hpc_calo.evaluate import compute

    try:
        return compute.run(cfg, geo)
    except OSError as err:
        mapped = storage_error(err, cfg.out.absolute().parent, needed)
        if mapped is None:
            raise
        raise mapped from None
