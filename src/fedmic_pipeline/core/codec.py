"""Global Parameter Decomposition: low-rank SVD coding of model updates (FedMIC 1b, FedKD).

After local training a client uploads the *update* D = W_local - W_global of the shared
model instead of the weights. Every parameter with two or more dimensions is viewed as a
matrix -- a conv weight (out, in, kh, kw) becomes out x (in*kh*kw), so that the whole
layer is decomposed at once (decomposing each kh x kw kernel slice separately, as some
public code does, cannot compress a 3x3 kernel at all) -- and truncated to the smallest
rank r whose singular values keep a fraction E of the energy:

    sum_{i<=r} s_i^2 >= E * sum_i s_i^2            ("dynamic singular-value selection")

The client sends ``name::U`` = U_r diag(s_r) (m x r) and ``name::V`` = V_r (n x r) when the
factors are smaller than the matrix, r (m + n) < m n, else the dense matrix under ``name``.
1-D parameters, buffers and non-float tensors always go dense. The energy threshold rises
over rounds, E(t) = E_start + (E_end - E_start) t / (R - 1), 0.95 -> 0.98 by default (the
FedKD schedule), so early, noisy updates are compressed harder than late, fine ones.

Interpretations recorded here (the papers publish no code):

* ``codec.rank_rule``: the factored/dense decision compares *element counts*,
  r (m + n) < m n, as the method text states -- also when factors are sent in fp16 (then a
  factored layer costs r (m + n) * 2 bytes against m n * 4 dense bytes).
* ``codec.zero_update``: an all-zero matrix (e.g. a frozen layer) has rank 0. It is sent
  as two *empty* factors (m x 0 and n x 0: zero bytes) that decode to an exact zero matrix
  -- never a NaN from dividing by a zero energy, and never a silently missing key.
* ``codec.round_index``: ``t`` is the 0-based round index, t = 0 .. R-1; a run of R = 1
  round uses E_start.
* ``codec.fp16_factors``: optional, beyond the paper; the factors are rounded to float16
  (the dense fallback keeps its dtype). A layer whose factors would overflow float16 is
  sent in float32 instead.
* ``codec.error_feedback``: optional, beyond the paper; the client keeps the truncation
  residual D - decode(encode(D)) and adds it to its next update, so that what is dropped
  in one round is sent later instead of being lost (see :class:`ErrorFeedback`).
* ``codec.svd_dtype``: the SVD runs in float32 (fast on CPU); matrices with at most
  ``FLOAT64_MAX_NUMEL`` entries are decomposed in float64, where the cost is negligible and
  the rank decision is then exact up to float64 rounding.

Everything here is pure tensor code: no file I/O, no training, deterministic on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedmic_pipeline.core.protocol import ConfigurationError, Payload

__all__ = [
    "FACTOR_U",
    "FACTOR_V",
    "FLOAT64_MAX_NUMEL",
    "EncodeStats",
    "ErrorFeedback",
    "LayerStats",
    "as_matrix",
    "decode_update",
    "dense_nbytes",
    "encode_update",
    "energy_threshold",
    "select_rank",
    "validate_energy",
]

FACTOR_U = "::U"
FACTOR_V = "::V"
#: Matrices with at most this many entries are decomposed in float64 (cheap, exact rank rule).
FLOAT64_MAX_NUMEL = 16_384
_FP16_MAX = float(torch.finfo(torch.float16).max)


def validate_energy(energy: float, what: str = "energy") -> float:
    """Return ``energy`` as a float after checking 0 < E <= 1; raise a ConfigurationError."""
    try:
        value = float(energy)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what} must be a number in (0, 1], got {energy!r}") from exc
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ConfigurationError(
            f"{what} must be in (0, 1] (the fraction of squared singular-value energy kept, "
            f"e.g. 0.95), got {energy!r}"
        )
    return value


def energy_threshold(round: int, num_rounds: int, start: float = 0.95, end: float = 0.98) -> float:
    """Energy threshold E(t) for 0-based round ``round`` of ``num_rounds``.

    Linear from ``start`` (t = 0) to ``end`` (t = R - 1); R = 1 returns ``start``. Rounds
    past the end are clamped to ``end`` (a resumed or extended run never exceeds it).
    """
    start = validate_energy(start, "energy start")
    end = validate_energy(end, "energy end")
    if int(num_rounds) < 1:
        raise ConfigurationError(f"num_rounds must be >= 1, got {num_rounds}")
    if int(round) < 0:
        raise ConfigurationError(f"round must be a 0-based index >= 0, got {round}")
    if num_rounds == 1:
        return start
    frac = min(1.0, int(round) / (int(num_rounds) - 1))
    return start + (end - start) * frac


def select_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * sum_i s_i^2 (singular values descending).

    The cumulative energy is summed in float64 and the total is taken as the *last* entry
    of that same cumulative sum, so the threshold is always reached (at the latest at
    r = len(s)) -- there is no loop that can run out and leave rank 0 for a non-zero
    matrix. A zero (or empty) spectrum returns 0 explicitly.
    """
    energy = validate_energy(energy)
    s = singular_values.detach().to(torch.float64).reshape(-1)
    if s.numel() == 0:
        return 0
    if not bool(torch.isfinite(s).all()):
        raise ValueError("singular values contain NaN/inf: the update itself is not finite")
    cum = torch.cumsum(s * s, dim=0)
    total = float(cum[-1])
    if total <= 0.0:
        return 0
    target = energy * total
    # The tolerance only absorbs float64 rounding in `energy * total` (relative 1e-12);
    # it can never move the decision by a meaningful amount of energy.
    target -= 1e-12 * total
    r = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item()) + 1
    return min(max(r, 1), s.numel())


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """View a >=2-D tensor as out x (everything else): conv (o, i, kh, kw) -> o x (i*kh*kw)."""
    return tensor.reshape(tensor.shape[0], -1)


def dense_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the tensors sent densely in their own dtypes (the FedAvg equivalent)."""
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


def _is_compressible(tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and tensor.is_floating_point() and min(tensor.shape[0], tensor[0].numel()) >= 1


@dataclass(frozen=True)
class LayerStats:
    """What the codec did to one tensor; ``rank`` is -1 for tensors sent dense by type."""

    name: str
    shape: tuple[int, ...]
    rank: int
    full_rank: int
    factored: bool
    energy_kept: float
    rel_error: float
    encoded_bytes: int
    dense_bytes: int
    norm_sq: float = 0.0


@dataclass
class EncodeStats:
    """Exact byte counts and per-layer ranks/errors of one encoded update."""

    energy: float
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def encoded_bytes(self) -> int:
        return int(sum(layer.encoded_bytes for layer in self.layers))

    @property
    def dense_bytes(self) -> int:
        return int(sum(layer.dense_bytes for layer in self.layers))

    @property
    def compression_ratio(self) -> float:
        """dense / encoded bytes (> 1 means the encoding is smaller)."""
        enc = self.encoded_bytes
        return float("inf") if enc == 0 else self.dense_bytes / enc

    @property
    def rel_error(self) -> float:
        """||D - decode(encode(D))||_F / ||D||_F over all float tensors together."""
        return self._rel_error(self.layers)

    @property
    def rel_error_matrices(self) -> float:
        """The same over the >=2-D tensors only (the ones the SVD may truncate): the dense
        1-D entries, e.g. BN running variances, can dominate the norm of the whole update."""
        return self._rel_error([layer for layer in self.layers if layer.rank >= 0])

    @staticmethod
    def _rel_error(layers: list[LayerStats]) -> float:
        num = sum((layer.rel_error**2) * layer.norm_sq for layer in layers)
        den = sum(layer.norm_sq for layer in layers)
        return 0.0 if den == 0.0 else math.sqrt(num / den)

    def as_metrics(self, prefix: str = "codec/", per_layer: bool = True) -> dict[str, float]:
        """Flat float metrics for logging: totals, mean rank of the factored layers and,
        with ``per_layer``, every matrix's rank."""
        out = {
            f"{prefix}energy": float(self.energy),
            f"{prefix}bytes_encoded": float(self.encoded_bytes),
            f"{prefix}bytes_dense": float(self.dense_bytes),
            f"{prefix}compression_ratio": float(self.compression_ratio),
            f"{prefix}rel_error": float(self.rel_error),
            f"{prefix}rel_error_matrices": float(self.rel_error_matrices),
            f"{prefix}layers_factored": float(sum(layer.factored for layer in self.layers)),
        }
        ranks = [layer.rank for layer in self.layers if layer.factored]
        out[f"{prefix}mean_rank"] = float(sum(ranks) / len(ranks)) if ranks else 0.0
        if per_layer:
            for layer in self.layers:
                if layer.rank >= 0:
                    out[f"{prefix}rank/{layer.name}"] = float(layer.rank)
        return out


def _factor_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    work_dtype = torch.float64 if matrix.numel() <= FLOAT64_MAX_NUMEL else torch.float32
    u, s, vh = torch.linalg.svd(matrix.to(work_dtype), full_matrices=False)
    return u, s, vh


def encode_update(
    delta: Mapping[str, torch.Tensor], energy: float, fp16_factors: bool = False
) -> tuple[Payload, EncodeStats]:
    """Encode an update dict into an upload payload; return it with exact stats.

    >=2-D float tensors: SVD of the out x rest matrix, rank by :func:`select_rank`;
    ``name::U`` (m x r, = U_r diag(s_r)) and ``name::V`` (n x r) when r (m+n) < m n,
    else dense ``name``. Everything else dense, in its own dtype. Payload tensors are
    detached, contiguous copies on the input's device (the payload never aliases the
    model). Raises ValueError on a non-finite update (diverged training), naming the layer.
    """
    energy = validate_energy(energy)
    payload: Payload = {}
    stats = EncodeStats(energy=energy)
    for name, tensor in delta.items():
        if FACTOR_U in name or FACTOR_V in name:
            raise ValueError(f"parameter name {name!r} collides with the codec's factor suffixes")
        t = tensor.detach()
        dense_b = t.numel() * t.element_size()
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"update of {name!r} contains NaN/inf; local training diverged (lower the learning rate)")
        sq = float(t.double().pow(2).sum()) if t.is_floating_point() else 0.0
        if not _is_compressible(t):
            payload[name] = t.clone().contiguous()
            stats.layers.append(LayerStats(name, tuple(t.shape), -1, -1, False, 1.0, 0.0, dense_b, dense_b, sq))
            continue
        mat = as_matrix(t)
        m, n = mat.shape
        full_rank = min(m, n)
        if sq == 0.0:
            rank = 0
            s = torch.zeros(0, dtype=torch.float64)
            u = vh = None
        else:
            u, s, vh = _factor_svd(mat)
            rank = select_rank(s, energy)
        if rank * (m + n) < m * n:
            factor_dtype = torch.float32
            if rank == 0:
                u_r = torch.zeros(m, 0, dtype=torch.float32, device=t.device)
                v_r = torch.zeros(n, 0, dtype=torch.float32, device=t.device)
            else:
                assert u is not None and vh is not None
                u_r = u[:, :rank] * s[:rank]
                v_r = vh[:rank, :].T
                if fp16_factors and max(float(u_r.abs().max()), float(v_r.abs().max())) < _FP16_MAX:
                    factor_dtype = torch.float16
            u_r = u_r.to(factor_dtype).contiguous()
            v_r = v_r.to(factor_dtype).contiguous()
            payload[name + FACTOR_U] = u_r
            payload[name + FACTOR_V] = v_r
            recon = (
                (u_r.to(torch.float64) @ v_r.to(torch.float64).T)
                if rank
                else torch.zeros(m, n, dtype=torch.float64, device=t.device)
            )
            err_sq = float((mat.to(torch.float64) - recon).pow(2).sum())
            s_sq = s.to(torch.float64).pow(2)
            kept = 1.0 if sq == 0.0 else float(s_sq[:rank].sum() / s_sq.sum())
            enc_b = u_r.numel() * u_r.element_size() + v_r.numel() * v_r.element_size()
            stats.layers.append(
                LayerStats(
                    name, tuple(t.shape), rank, full_rank, True, kept,
                    0.0 if sq == 0.0 else math.sqrt(err_sq / sq), enc_b, dense_b, sq,
                )
            )
        else:
            payload[name] = t.clone().contiguous()
            stats.layers.append(
                LayerStats(name, tuple(t.shape), rank, full_rank, False, 1.0, 0.0, dense_b, dense_b, sq)
            )
    return payload, stats


def decode_update(
    payload: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Rebuild the update dict ``name -> tensor of shapes[name]`` from an encoded payload.

    Factored entries become (U V^T) reshaped to the original shape in ``dtype``; dense
    entries keep their own dtype. A name with neither a dense nor a factored entry raises
    (a missing layer must never be read as a zero update), as do unexpected extra keys.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name, shape in shapes.items():
        shape = torch.Size(shape)
        if name in payload:
            t = payload[name]
            if t.shape != shape:
                raise ValueError(f"dense entry {name!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
            out[name] = t.detach().clone()
            used.add(name)
        elif name + FACTOR_U in payload and name + FACTOR_V in payload:
            u = payload[name + FACTOR_U].to(dtype)
            v = payload[name + FACTOR_V].to(dtype)
            m = shape[0]
            n = int(math.prod(shape[1:]))
            if u.shape[0] != m or v.shape[0] != n or u.shape[1] != v.shape[1]:
                raise ValueError(
                    f"factors of {name!r} have shapes {tuple(u.shape)}, {tuple(v.shape)}; "
                    f"expected ({m}, r) and ({n}, r)"
                )
            out[name] = (u @ v.T).reshape(shape) if u.shape[1] else torch.zeros(shape, dtype=dtype, device=u.device)
            used.update((name + FACTOR_U, name + FACTOR_V))
        else:
            raise KeyError(f"payload has no dense or factored entry for {name!r}")
    extra = set(payload) - used
    if extra:
        raise KeyError(f"payload has entries not in the model: {sorted(extra)[:5]}")
    return out


class ErrorFeedback:
    """Client-side error feedback: residual_t = (D_t + residual_{t-1}) - decode(encode(.)).

    Usage per round: ``corrected = ef.add(delta)``; encode ``corrected``; then
    ``ef.update(corrected, decoded)``. The residual lives in the client state (never
    travels). ``state_dict``/``load_state_dict`` make it a plain tensor dict.
    """

    def __init__(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}

    def add(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return delta + residual (float tensors only; others pass through)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in delta.items():
            r = self.residual.get(name)
            out[name] = t + r.to(t.dtype) if (r is not None and t.is_floating_point()) else t
        return out

    def update(self, corrected: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]) -> None:
        """Keep what the encoding dropped: residual = corrected - decoded (float tensors)."""
        self.residual = {
            name: (t - decoded[name].to(t.dtype)).detach().clone()
            for name, t in corrected.items()
            if t.is_floating_point()
        }

    def norm(self) -> float:
        """Frobenius norm of the whole residual (for logging)."""
        return math.sqrt(sum(float(r.double().pow(2).sum()) for r in self.residual.values()))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.residual = {k: v.clone() for k, v in state.items()}
