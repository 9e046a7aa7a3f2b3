"""Fast one-pass sampling for the IAF students: the nflows student rewritten as a few plain GEMMs per block.

What it removes from the plain nflows path (``flow._transform.inverse``), all without changing the result:
- masks: ``weight * mask`` is computed once, not on every call;
- permutations: folded into the weights (each block's input columns and output rows are reordered so that
  the data never move), leaving one gather at the very end;
- the context: the context layers of all blocks are stacked into one GEMM per call;
- the layout: the state is feature-major (D, B), so the output GEMM writes each spline parameter as one
  contiguous slab and ``hpc_calo.flows.spline.rq_spline_sample`` (the inverse spline without log-determinant)
  runs every op on contiguous memory;
- optionally ``torch.compile`` (fuses the spline's elementwise chain) and, on a GPU, a CUDA graph replay.

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


class FastStudent(nn.Module):
    """z -> x for one IAF student, built once from the trained nflows flow (the weights are copied)."""

    def __init__(self, flow: flows.Flow, matmul_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        seq = list(flow._transform._transforms)[::-1]  # sampling order
        features = None
        # index[j] = storage column that holds the j-th coordinate of the current (logical) tensor.
        index: torch.Tensor | None = None
        ctx_w, ctx_b = [], []
        self.n_blocks = 0
        self.n_hidden = 0
        spline = None
        for t in seq:
            if isinstance(t, transforms.Permutation):
                perm = t._permutation
                features = perm.numel() if features is None else features
                index = torch.arange(features) if index is None else index
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
            features = made.initial_layer.in_features if features is None else features
            index = torch.arange(features) if index is None else index
            inv = torch.argsort(index)
            spline = (block.num_bins, float(block.tail_bound), block.min_bin_width, block.min_bin_height,
                      block.min_derivative)
            i = self.n_blocks
            with torch.no_grad():
                w_in = (made.initial_layer.weight * made.initial_layer.mask)[:, inv]
                self.register_buffer(f"w_in{i}", w_in.detach().clone())
                self.register_buffer(f"b_in{i}", made.initial_layer.bias.detach().clone().unsqueeze(1))
                for j, hb in enumerate(made.blocks):
                    self.register_buffer(f"w_h{i}_{j}", (hb.linear.weight * hb.linear.mask).detach().clone())
                    self.register_buffer(f"b_h{i}_{j}", hb.linear.bias.detach().clone().unsqueeze(1))
                n_par = made.final_layer.out_features // features
                # Output rows: nflows orders them (dimension, parameter); here (parameter, storage column).
                w_out = (made.final_layer.weight * made.final_layer.mask).reshape(features, n_par, -1)[inv]
                self.register_buffer(f"w_out{i}", w_out.transpose(0, 1).reshape(features * n_par, -1).clone())
                b_out = made.final_layer.bias.reshape(features, n_par)[inv].t()
                self.register_buffer(f"b_out{i}", b_out.reshape(-1, 1).clone())
                ctx_w.append(made.context_layer.weight.detach())
                ctx_b.append(made.context_layer.bias.detach())
            self.n_hidden = len(made.blocks)
            self.n_blocks += 1
        if spline is None or index is None or features is None:
            raise TypeError("FastStudent: the flow has no spline blocks")
        self.features = features
        self.n_par = 3 * spline[0] - 1
        self.bins, self.bound, self.min_width, self.min_height, self.min_derivative = spline
        self.hidden = ctx_w[0].shape[0]
        self.register_buffer("w_ctx", torch.cat(ctx_w).clone())
        self.register_buffer("b_ctx", torch.cat(ctx_b).clone().unsqueeze(1))
        self.register_buffer("out_index", index.clone())
        self.matmul_dtype = matmul_dtype
        self.spline: Callable[..., torch.Tensor] = rq_spline_sample
        if matmul_dtype is not None:  # cast once: the weights and biases of every GEMM
            for name, buf in self.named_buffers():
                if name.startswith(("w_", "b_")):
                    setattr(self, name, buf.to(matmul_dtype))

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
        # Feature-major state (D, B): the output GEMM then writes each spline parameter as one contiguous (D, B)
        # slab, the layout rq_spline_sample runs fastest in. With matmul_dtype the activations stay in it from
        # GEMM to GEMM (bias and ReLU included), and the spline reads its parameters in it.
        mm = self.matmul_dtype or z.dtype
        h = self.hidden
        ctx = torch.addmm(self.b_ctx, self.w_ctx, context.t().to(mm)).relu_()
        u = z.t().contiguous()
        for i in range(self.n_blocks):
            t = torch.addmm(getattr(self, f"b_in{i}"), getattr(self, f"w_in{i}"), u.to(mm))
            t = t.add_(ctx[i * h : (i + 1) * h]).relu_()
            for j in range(self.n_hidden):
                t = torch.addmm(getattr(self, f"b_h{i}_{j}"), getattr(self, f"w_h{i}_{j}"), t).relu_()
            p = torch.addmm(getattr(self, f"b_out{i}"), getattr(self, f"w_out{i}"), t)  # the spline reads bf16
            u = self.spline(u, p.view(self.n_par, self.features, -1), self.bound, self.min_width,
                            self.min_height, self.min_derivative)
        return u.index_select(0, self.out_index).t().contiguous()

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
