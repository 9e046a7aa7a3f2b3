"""Is the student good enough? Two numbers per distilled flow, on samples of the flow alone.

- The teacher's log-likelihood of the student's samples, beside that of the teacher's own samples and of the
  data, all for the same contexts: a student that matches its teacher scores like the teacher's samples.
- The AUC of a gradient-boosted tree classifier told to separate student samples from teacher samples (features
  and context); 0.5: the teacher cannot be told from its student.

Contexts come from the validation split, so both flows see the conditions they will see in generation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from hpc_calo.flows import fast_sampler
from hpc_calo.models import FlowModel

BATCH = 1000


@torch.no_grad()
def diagnose(teacher: FlowModel, student: FlowModel, batches: Iterable[Mapping[str, torch.Tensor]], n: int,
             seed: int = 0) -> dict[str, Any]:
    """Score ``student`` against ``teacher`` on up to ``n`` validation rows (fewer when the split is smaller)."""
    torch.manual_seed(seed)
    xs, cs = [], []
    rows = 0
    for batch in batches:
        x, c = teacher.inputs(teacher.select(dict(batch)))
        xs.append(x)
        cs.append(c)
        rows += len(x)
        if rows >= n:
            break
    data, context = torch.cat(xs)[:n], torch.cat(cs)[:n]
    sample_t, sample_s = fast_sampler(teacher.flow), fast_sampler(student.flow)
    g = torch.Generator(device=data.device).manual_seed(seed)
    out_t, out_s, ll = [], [], {"data": [], "teacher_samples": [], "student_samples": []}
    for a in range(0, len(data), BATCH):
        c = context[a : a + BATCH]
        z = torch.randn(len(c), data.shape[1], generator=g, dtype=data.dtype, device=data.device)
        xt, xs_ = sample_t(z, c), sample_s(z, c)
        out_t.append(xt)
        out_s.append(xs_)
        for key, x in (("data", data[a : a + BATCH]), ("teacher_samples", xt), ("student_samples", xs_)):
            ll[key].append(teacher.log_prob(x, c))
    feats_t = torch.cat([torch.cat(out_t), context], 1).cpu().numpy()
    feats_s = torch.cat([torch.cat(out_s), context], 1).cpu().numpy()
    result: dict[str, Any] = {"samples": len(data)}
    for key, parts in ll.items():
        v = torch.cat(parts)
        finite = torch.isfinite(v)
        result[f"teacher_loglik_{key}"] = float(v[finite].mean()) if finite.any() else None
        result[f"nonfinite_{key}"] = int((~finite).sum())
    result["student_vs_teacher_auc"] = _auc(feats_s, feats_t, seed)
    return result


def _auc(a: np.ndarray, b: np.ndarray, seed: int) -> float:
    """Held-out AUC of boosted trees separating ``a`` (label 0) from ``b`` (label 1); half of the rows to train.

    Row i of ``a`` and row i of ``b`` are twins (the same noise z and context): they go to the same half. Split
    apart, a classifier that has learnt a training row labels its held-out twin wrongly, so a student close to its
    teacher would score well below 0.5 (0.2-0.35 for twins that differ by 1 %)."""
    rng = np.random.default_rng(seed)
    train = rng.random(len(a)) < 0.5

    def rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([a[mask], b[mask]]).astype(np.float32)
        return np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6), np.r_[np.zeros(mask.sum()), np.ones(mask.sum())]

    (x, y), (x_test, y_test) = rows(train), rows(~train)
    # Early stopping holds out 10 % of the training half: it needs rows of both classes there (a tiny validation
    # set, as in quick runs, has ~10 rows).
    clf = HistGradientBoostingClassifier(max_iter=200, early_stopping=bool(len(x) >= 100), random_state=seed)
    clf.fit(x, y)
    return float(roc_auc_score(y_test, clf.predict_proba(x_test)[:, 1]))
