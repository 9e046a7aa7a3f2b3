"""Fast one-pass sampling for the IAF students: the nflows student rewritten as a few plain GEMMs per block.

``FastStudent`` samples the students, ``FastMAF`` the MAFs (flow-1 and teachers sampled without a student); each
says what it removes from the plain nflows path.

Numerics: float64 and float32 agree with nflows to rounding (tests/test_fast.py). ``matmul_dtype=torch.bfloat16``
runs the GEMMs and the activations between them in bf16 (spline in float32): faster where the hardware has bf16
units (AMX, avx512_bf16), at a measured cost in fidelity (BENCHMARKS.md, "bf16 fidelity", measured by
``python -m bench.precision``) — off by default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from nflows import flows, transforms
from torch import nn

from hpc_calo.flows.build import InverseSplineAutoregressiveTransform, SplineAutoregressiveTransform
from hpc_calo.flows.passes import is_student
from hpc_calo.flows.spline import rq_spline_sample

CPU_CHUNK_BYTES = 4 * 2**20  # spline parameters per CPU chunk in FastStudent.forward (316 DS2 rows in float32)
GEMM_GROUPS = 4  # feature groups of FastStudent's block-triangular GEMMs: (G + 1) / 2G of the dense work


def _row_groups(degrees: torch.Tensor, edges: list[int]) -> list[tuple[int, int]]:
    """Row ranges of degree-sorted units, one per feature group: group g holds degrees in (edges[g], edges[g+1]]."""
    cut = torch.searchsorted(degrees, torch.tensor(edges[1:-1]), right=True).tolist()
    return list(zip([0, *cut], [*cut, len(degrees)], strict=True))


def _prefix(mask: torch.Tensor, rows: tuple[int, int]) -> int:
    """Columns a row range needs: up to its last nonzero mask entry (columns are degree-sorted)."""
    used = mask[rows[0] : rows[1]].any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 0


def _group_major(rows: torch.Tensor, groups: int, n_par: int) -> torch.Tensor:
    """MADE output rows from nflows' (feature, parameter) order to (group, parameter, feature in group): each
    group's GEMM then writes its (parameter, feature, batch) slab contiguously."""
    return rows.reshape(groups, -1, n_par, rows.shape[-1]).transpose(1, 2).reshape(rows.shape)


class FastStudent(nn.Module):
    """z -> x for one IAF student, built once from the trained nflows flow (the weights are copied).

    What it removes from the plain nflows path (``flow._transform.inverse``), all without changing the result:
    - masks: ``weight * mask`` is computed once, not on every call;
    - the masked-out half of every GEMM: a MADE is triangular once its units are sorted by degree (a unit of
      degree k reads the inputs of degree <= k), so each layer runs as ``GEMM_GROUPS`` row groups that each read
      only the prefix of the previous layer they depend on: (G + 1) / 2G of the dense work (5/8 at G = 4);
    - the context: the context layers of all blocks are stacked into one GEMM per call;
    - the layout: the state is feature-major (D, B) in each block's own feature order (one row gather per
      block), so the output GEMM writes each spline parameter of a feature group as one contiguous slab and
      ``hpc_calo.flows.spline.rq_spline_sample`` (the inverse spline without log-determinant) runs every op on
      contiguous rows;
    - optionally ``torch.compile`` (fuses the spline's elementwise chain) and, on a GPU, a CUDA graph replay.
    """

    def __init__(self, flow: flows.Flow, matmul_dtype: torch.dtype | None = None, groups: int | None = None) -> None:
        super().__init__()
        if groups is None:  # bf16 GEMMs (oneDNN) pay a per-call cost that eats what the smaller ones save
            groups = GEMM_GROUPS if matmul_dtype is None else 1
        seq = list(flow._transform._transforms)[::-1]  # sampling order
        # index[j] = storage row that holds the j-th coordinate of the current (logical) tensor.
        index: torch.Tensor | None = None
        ctx_w, ctx_b = [], []
        self.n_blocks = 0
        self.gemms: list[list[list[tuple[int, int, int]]]] = []  # per block, per layer: (first row, end, columns)
        self.gathers: list[bool] = []  # per block: whether its input rows are gathered into its feature order
        spline = None
        for t in seq:
            if isinstance(t, transforms.Permutation):
                perm = t._permutation
                index = torch.arange(perm.numel()) if index is None else index
                index = index[torch.argsort(perm)]  # the student applies the inverse permutation
                continue
            if not isinstance(t, transforms.InverseTransform) or not isinstance(
                t._transform, InverseSplineAutoregressiveTransform
            ):
                raise TypeError("FastStudent needs a student flow from hpc_calo.flows.build.build_iaf")
            block = t._transform
            made = block.autoregressive_net
            if made.use_residual_blocks or made.activation is not F.relu or not hasattr(made, "context_layer"):
                raise NotImplementedError("FastStudent supports the feed-forward ReLU MADE with a context")
            if any(b.batch_norm is not None for b in made.blocks):
                raise NotImplementedError("FastStudent does not support batch norm")
            features = made.initial_layer.in_features
            n_groups = max(g for g in range(1, groups + 1) if features % g == 0)
            size = features // n_groups
            edges = [g * size for g in range(n_groups + 1)]  # group g: features (logical) g*size .. (g+1)*size-1
            i = self.n_blocks
            gather = index is not None and not torch.equal(index, torch.arange(features))
            if gather:
                self.register_buffer(f"gather{i}", index.clone())
            self.gathers.append(gather)
            index = torch.arange(features)  # after the gather, storage order is this block's feature order
            spline = (block.num_bins, float(block.tail_bound), block.min_bin_width, block.min_bin_height,
                      block.min_derivative)
            layers = [made.initial_layer] + [b.linear for b in made.blocks]
            gemms = []
            with torch.no_grad():
                prev: torch.Tensor | None = None  # the previous layer's unit order (None: the inputs, as they are)
                for li, lin in enumerate(layers):
                    order = torch.argsort(lin.degrees, stable=True)
                    w, mask = (lin.weight * lin.mask)[order], lin.mask[order]
                    if prev is not None:
                        w, mask = w[:, prev], mask[:, prev]
                    rows = _row_groups(lin.degrees[order], edges)
                    gemms.append(self._weights(f"w{i}_{li}", w, [(a, b, _prefix(mask, (a, b))) for a, b in rows]))
                    self.register_buffer(f"b{i}_{li}", lin.bias[order].detach().clone().unsqueeze(1))
                    if li == 0:  # the context enters the initial layer's units
                        ctx_w.append(made.context_layer.weight[order].detach())
                        ctx_b.append(made.context_layer.bias[order].detach())
                    prev = order
                final = made.final_layer
                n_par = final.out_features // features
                w_out = _group_major((final.weight * final.mask)[:, prev], n_groups, n_par)
                mask_out = _group_major(final.mask[:, prev], n_groups, n_par)
                rows_out = [(g * n_par * size, (g + 1) * n_par * size) for g in range(n_groups)]
                rows_out = [(a, b, _prefix(mask_out, (a, b))) for a, b in rows_out]
                gemms.append(self._weights(f"w{i}_out", w_out, rows_out))
                self.register_buffer(f"b{i}_out", _group_major(final.bias.unsqueeze(1), n_groups, n_par).clone())
            self.gemms.append(gemms)
            self.n_blocks += 1
        if spline is None or index is None:
            raise TypeError("FastStudent: the flow has no spline blocks")
        self.features, self.n_groups, self.group_size = features, n_groups, size
        self.n_par = 3 * spline[0] - 1
        self.bins, self.bound, self.min_width, self.min_height, self.min_derivative = spline
        self.hidden = ctx_w[0].shape[0]
        self.register_buffer("w_ctx", torch.cat(ctx_w).clone())
        self.register_buffer("b_ctx", torch.cat(ctx_b).clone().unsqueeze(1))
        # A student ends with a block, so its output is in that block's order: no gather unless a flow ends otherwise.
        self.register_buffer("out_index", None if torch.equal(index, torch.arange(features)) else index.clone())
        self.matmul_dtype = matmul_dtype
        self.spline: Callable[..., torch.Tensor] = rq_spline_sample
        if matmul_dtype is not None:  # cast once: the weights and biases of every GEMM
            for name, buf in self.named_buffers():
                if name.startswith(("w", "b")):
                    setattr(self, name, buf.to(matmul_dtype))

    def _weights(self, name: str, w: torch.Tensor, groups: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Keeps each group's weights as their own contiguous matrix (``name_g``): bf16 GEMM kernels copy a
        strided one on every call."""
        for g, (a, b, c) in enumerate(groups):
            if c:
                self.register_buffer(f"{name}_{g}", w[a:b, :c].detach().clone())
        return groups

    def compile(self) -> FastStudent:  # type: ignore[override]
        """Use the compiled spline from now on (plain eager stays the fallback: a new FastStudent)."""
        self.spline = compiled_spline()
        return self

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Samples x for latent z (B, D) and preprocessed context (B, C); no log-determinant."""
        rows = max(16, CPU_CHUNK_BYTES // (self.n_par * self.features * z.element_size()))
        if z.device.type == "cpu" and z.shape[0] > rows:
            # Cache blocking: a block's spline parameters are B x (3K - 1) x D floats (13 MB per 1000 DS2 rows,
            # 83 MB for DS3); a chunk's stay in cache from the GEMM that writes them to the spline that reads them.
            return torch.cat([self._sample(z[a : a + rows], context[a : a + rows]) for a in range(0, len(z), rows)])
        return self._sample(z, context)

    def _sample(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        # With matmul_dtype the activations stay in it from GEMM to GEMM (bias and ReLU included), and the spline
        # reads its parameters in it.
        mm = self.matmul_dtype or z.dtype
        h, n = self.hidden, z.shape[0]
        g, size = self.n_groups, self.group_size
        ctx = torch.addmm(self.b_ctx, self.w_ctx, context.t().to(mm)).relu_()
        u = z.t().contiguous()
        for i, gemms in enumerate(self.gemms):
            if self.gathers[i]:
                u = u.index_select(0, getattr(self, f"gather{i}"))
            t = u.to(mm)
            for li, groups in enumerate(gemms[:-1]):
                t = self._gemm(f"{i}_{li}", t, groups)
                if li == 0:
                    t.add_(ctx[i * h : (i + 1) * h])
                t.relu_()
            p = self._gemm(f"{i}_out", t, gemms[-1])
            # p: (group, parameter, feature in group, batch) -> the spline's (parameter, group, feature, batch)
            p = p.view(g, self.n_par, size, n).transpose(0, 1)
            u = self.spline(u.view(g, size, n), p, self.bound, self.min_width, self.min_height,
                            self.min_derivative).view(self.features, n)
        if self.out_index is not None:
            u = u.index_select(0, self.out_index)
        return u.t().contiguous()

    def _gemm(self, name: str, x: torch.Tensor, groups: list[tuple[int, int, int]]) -> torch.Tensor:
        """bias + W @ x as the block-triangular GEMM: rows a:b of the output read the first c rows of x only."""
        bias = getattr(self, f"b{name}")
        out = x.new_empty(groups[-1][1], x.shape[1])
        for g, (a, b, c) in enumerate(groups):
            if c:
                torch.addmm(bias[a:b], getattr(self, f"w{name}_{g}"), x[:c], out=out[a:b])
            else:
                out[a:b] = bias[a:b]
        return out

    sample = forward


class FastMAF(nn.Module):
    """z -> x for a MAF teacher: each MADE evaluated once per sample in total, not once per feature.

    Sampling a MAF block inverts the spline feature by feature, and nflows re-runs the whole MADE for every
    feature (D full passes per block). But a hidden unit of degree k depends on the inputs of degree <= k only,
    so once x_k is known the units of degree k are final. Here the hidden units of every layer are sorted by
    degree; the step for feature d computes just the units of degree d - 1 of each layer (a contiguous slice)
    and the d-th feature's spline parameters, so a block costs about one MADE pass plus D small steps. The
    result equals nflows' to rounding (tests/test_fast.py). Used for flow-1 (which stays a MAF) and for
    teachers that are sampled without a student.
    """

    def __init__(self, flow: flows.Flow) -> None:
        super().__init__()
        self.steps: list[tuple[str, int]] = []  # ("perm", i) or ("made", i), in sampling order
        self.bounds: list[list[list[int]]] = []  # per MADE, per layer: bounds[k] = units of degree <= k
        n_perm = 0
        spline = None
        for t in list(flow._transform._transforms)[::-1]:
            if isinstance(t, transforms.Permutation):
                self.register_buffer(f"perm{n_perm}", torch.argsort(t._permutation))
                self.steps.append(("perm", n_perm))
                n_perm += 1
                continue
            if not isinstance(t, SplineAutoregressiveTransform) or isinstance(t, InverseSplineAutoregressiveTransform):
                raise TypeError("FastMAF needs a teacher flow from hpc_calo.flows.build.build_maf")
            made = t.autoregressive_net
            if made.use_residual_blocks or made.activation is not F.relu or not hasattr(made, "context_layer"):
                raise NotImplementedError("FastMAF supports the feed-forward ReLU MADE with a context")
            if any(b.batch_norm is not None for b in made.blocks):
                raise NotImplementedError("FastMAF does not support batch norm")
            spline = (t.num_bins, float(t.tail_bound), t.min_bin_width, t.min_bin_height, t.min_derivative)
            self.features = features = made.initial_layer.in_features
            i = len(self.bounds)
            bounds: list[list[int]] = []
            with torch.no_grad():
                prev: torch.Tensor | None = None  # the previous layer's unit order
                for li, lin in enumerate([made.initial_layer] + [b.linear for b in made.blocks]):
                    order = torch.argsort(lin.degrees, stable=True)
                    w = (lin.weight * lin.mask)[order]
                    self.register_buffer(f"w{i}_{li}", (w if prev is None else w[:, prev]).clone())
                    self.register_buffer(f"b{i}_{li}", lin.bias[order].clone())
                    bounds.append(torch.cumsum(torch.bincount(lin.degrees, minlength=features + 1), 0).tolist())
                    if prev is None:  # the context enters the initial layer's units
                        self.register_buffer(f"wc{i}", made.context_layer.weight[order].clone())
                        self.register_buffer(f"bc{i}", made.context_layer.bias[order].clone())
                    prev = order
                n_par = made.final_layer.out_features // features
                w_out = (made.final_layer.weight * made.final_layer.mask)[:, prev]  # rows: (feature, parameter)
                self.register_buffer(f"wo{i}", w_out.reshape(features, n_par, -1).clone())
                self.register_buffer(f"bo{i}", made.final_layer.bias.reshape(features, n_par).clone())
            self.steps.append(("made", i))
            self.bounds.append(bounds)
        if spline is None:
            raise TypeError("FastMAF: the flow has no spline blocks")
        self.bins, self.bound, self.min_width, self.min_height, self.min_derivative = spline

    def _invert_made(self, i: int, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bounds = self.bounds[i]
        layers = [(getattr(self, f"w{i}_{li}"), getattr(self, f"b{i}_{li}")) for li in range(len(bounds))]
        w_out, b_out = getattr(self, f"wo{i}"), getattr(self, f"bo{i}")
        ctx = torch.relu(F.linear(context, getattr(self, f"wc{i}"), getattr(self, f"bc{i}")))
        x = torch.zeros_like(z)
        hs = [z.new_zeros(z.shape[0], w.shape[0]) for w, _ in layers]
        for d in range(self.features):
            if d > 0:  # x_d (degree d) is known: the units of degree d of every layer are final now
                src, width = x, d
                for li, (w, b) in enumerate(layers):
                    lo, hi = bounds[li][d - 1], bounds[li][d]
                    if hi > lo:
                        pre = F.linear(src[:, :width], w[lo:hi, :width], b[lo:hi])
                        hs[li][:, lo:hi] = torch.relu(pre + ctx[:, lo:hi] if li == 0 else pre)
                    src, width = hs[li], hi
            width = bounds[-1][d]  # feature d + 1 (degree d + 1) sees the last layer's units of degree <= d
            p = F.linear(hs[-1][:, :width], w_out[d, :, :width], b_out[d])
            x[:, d] = rq_spline_sample(z[:, d], p.t(), self.bound, self.min_width, self.min_height,
                                       self.min_derivative)
        return x

    @torch.no_grad()
    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Samples x for latent z (B, D) and context (B, C), as ``flow._transform.inverse`` (no log-det)."""
        x = z
        for kind, i in self.steps:
            x = x.index_select(1, getattr(self, f"perm{i}")) if kind == "perm" else self._invert_made(i, x, context)
        return x

    sample = forward


_COMPILED_SPLINE: Callable[..., torch.Tensor] | None = None


def compiled_spline() -> Callable[..., torch.Tensor]:
    """The spline under ``torch.compile`` (dynamic shapes), compiled once per process and shared.

    Only the spline is compiled: it is the chain of ~40 elementwise ops that Inductor fuses into one loop; the
    GEMMs gain nothing from it. Measured on the 2-core CPU box: ~50 s to compile once, then every flow, batch
    size and layer reuses it, versus ~80-100 s per (module, batch size) for compiling the whole sampler.
    """
    global _COMPILED_SPLINE
    if _COMPILED_SPLINE is None:
        _COMPILED_SPLINE = torch.compile(rq_spline_sample, dynamic=True, fullgraph=True)
    return _COMPILED_SPLINE


class CudaGraphSampler:
    """Replays a captured CUDA graph of a (compiled or plain) sampler for one fixed batch size.

    GPU only (guarded): sampling is launch-bound without it (``Chain.use_cuda_graphs`` wraps every flow). Inputs
    are copied into static buffers; the returned tensor is the static output buffer (copy it before the next
    call).
    """

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batch: int, features: int,
                 context: int, dtype: torch.dtype, device: torch.device) -> None:
        if not torch.cuda.is_available() or torch.device(device).type != "cuda":
            raise RuntimeError("CudaGraphSampler needs a CUDA device")
        # Streams and capture belong to the current device: make it the tensors' (an MPI rank's cuda:k).
        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.z = torch.zeros(batch, features, dtype=dtype, device=self.device)
            self.c = torch.zeros(batch, context, dtype=dtype, device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):  # warm-up (and compilation) outside the capture
                    fn(self.z, self.c)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph), torch.no_grad():
                self.out = fn(self.z, self.c)
        self.batch = batch

    def __call__(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if z.shape[0] != self.batch:
            raise ValueError(f"captured for batch {self.batch}, got {z.shape[0]}")
        with torch.cuda.device(self.device):
            self.z.copy_(z)
            self.c.copy_(context)
            self.graph.replay()
        return self.out


def fast_sampler(flow: flows.Flow, matmul_dtype: torch.dtype | None = None, compile: bool = False) -> nn.Module:
    """The fast z -> x of a built flow: FastStudent for a student, FastMAF for a MAF teacher.

    ``matmul_dtype`` and ``compile`` apply to students only (a MAF's steps are too small to gain from either).
    """
    if is_student(flow):
        fast = FastStudent(flow, matmul_dtype=matmul_dtype)
        return fast.compile() if compile else fast
    return FastMAF(flow)
