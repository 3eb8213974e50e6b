"""Import a released Lung-DDPM checkpoint (e.g. ``Lung-DDPM-LIDC-IDRI-100000-steps.pt``) as a lungddpm checkpoint.

The file is ``torch.save({"step", "model", "ema"})`` of Lung-DDPM's trainer; ``model`` and ``ema`` are state dicts of
its ``GaussianDiffusion`` wrapper: the network (guided-diffusion ``UNetModel`` names) under ``denoise_fn.`` and the
schedule's buffers (``betas``, ``alphas_cumprod``, ...) at the top level. :class:`UNet3D` uses the same module names,
so the mapping is a prefix strip, checked strictly: the architecture is read off the tensor shapes, every source
tensor must land on a network tensor of the same shape or be a known schedule buffer, every network tensor must be
covered, and the schedule must be one of ours (same T, betas ``allclose``). What shapes cannot tell — attention
heads (legacy QKV order, converted) and GroupNorm groups — comes from the config (Lung-DDPM: 1 and 32). The output
loads through :func:`lungddpm.diffusion.checkpoint.load_model` like a trained checkpoint and names the ``lung-ddpm``
input convention, so sampling feeds the model the way it was trained.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_path
from ..config import Config
from .checkpoint import LUNG_DDPM_PREFIX, CheckpointError, load_checkpoint
from .convention import ConventionError, LungDDPMConvention
from .process import SCHEDULES, DiffusionConfig, make_scheduler
from .unet import LUNG_DDPM_TIME_MAX_PERIOD, UNet3D, UNetConfig

log = logging.getLogger(__name__)

WRAPPER = "module."  # what (Distributed)DataParallel's state_dict puts before every key
# the GaussianDiffusion buffers Lung-DDPM stores next to the network (all of shape [T])
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_mean_coef3",
)
# float32 storage of the same schedule: betas agree to ~6e-8 relative; the cumulative product to ~1.3e-5
SCHEDULE_TOLERANCE = {"betas": (1e-5, 1e-8), "alphas_cumprod": (1e-4, 1e-7)}  # (rtol, atol)
MAX_LISTED = 12  # problems listed in an error message
LUNG_DDPM_HEADS_GROUPS = (1, 32)  # the released network's attention heads (create_model's default) and GroupNorm32


@dataclass(frozen=True)
class ImportSummary:
    source: str
    sha256: str
    step: int
    tensors: int  # network tensors per state dict
    parameters: int
    unet: UNetConfig
    diffusion: DiffusionConfig
    seconds: float


def _fail(where: str, problems: list[str], hint: str) -> CheckpointError:
    shown = problems[:MAX_LISTED]
    more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return CheckpointError(f"{where}: {'; '.join(shown)}{more}. {hint}")


def _unwrap(state: Any, where: str) -> Any:
    """``state`` without the ``module.`` that (Distributed)DataParallel puts before every key, where all have it."""
    if isinstance(state, Mapping) and state and all(str(k).startswith(WRAPPER) for k in state):
        log.info("%s: keys saved through (Distributed)DataParallel ('%s' prefix): taken without it", where, WRAPPER)
        return {str(k).removeprefix(WRAPPER): v for k, v in state.items()}
    return state


def _need(net: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in net:
        raise _fail(
            where,
            [f"missing key {LUNG_DDPM_PREFIX}{key}"],
            "Is this a Lung-DDPM checkpoint (weights under 'denoise_fn.')?",
        )
    return net[key]


def infer_unet_config(
    net: Mapping[str, torch.Tensor], image_size: int, num_heads: int, norm_groups: int, where: str
) -> UNetConfig:
    """The :class:`UNetConfig` whose state dict has ``net``'s names (without ``denoise_fn.``) and shapes.

    Levels are read from ``input_blocks``: res blocks (``.0.in_layers.2``) until a downsampling conv (``.0.op``);
    attention where a block has ``.1.qkv``. ``image_size`` (the training grid edge) turns the attention levels
    into ``attention_resolutions``.
    """
    emb = _need(net, "time_embed.0.weight", where)  # [4 ch, ch]
    ch = int(emb.shape[1])
    if emb.shape[0] != 4 * ch:
        raise _fail(
            where,
            [f"{LUNG_DDPM_PREFIX}time_embed.0.weight: shape {list(emb.shape)}"],
            "expected [4 C, C] (C = base channels)",
        )
    conv_in = _need(net, "input_blocks.0.0.weight", where)  # [ch, image + layout, 3, 3, 3]
    out_channels = int(_need(net, "out.2.weight", where).shape[0])
    if out_channels != 1 or conv_in.shape[1] != 3:
        raise _fail(
            where,
            [f"{conv_in.shape[1]} input and {out_channels} output channels"],
            "lungddpm samples one CT channel conditioned on two layout channels (lung, nodule): 3 in, 1 out",
        )
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (res block output channels, attention after it)
    i = 1
    while True:
        if f"input_blocks.{i}.0.op.weight" in net:
            levels.append([])
        elif f"input_blocks.{i}.0.in_layers.2.weight" in net:
            out = int(net[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0])
            levels[-1].append((out, f"input_blocks.{i}.1.qkv.weight" in net))
        else:
            break
        i += 1
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts:
        raise _fail(
            where,
            [f"res blocks per level {[len(level) for level in levels]} in {LUNG_DDPM_PREFIX}input_blocks.*"],
            "every level must have the same number (>= 1) of res blocks",
        )
    mults = []
    for n, level in enumerate(levels):
        outs = {out for out, _ in level}
        if len(outs) != 1 or next(iter(outs)) % ch:
            raise _fail(where, [f"level {n} res blocks have {sorted(outs)} channels"], f"expected one multiple of {ch}")
        mults.append(next(iter(outs)) // ch)
    if mults[0] != 1:
        raise ConventionError(
            f"{where}: its first level has {mults[0]} x {ch} channels (channel_mult[0] = {mults[0]}); lungddpm's UNet "
            "starts at the base width (channel_mult[0] = 1, as Lung-DDPM's released network), so this network "
            "cannot be converted"
        )
    attention_ds = [2**n for n, level in enumerate(levels) if any(att for _, att in level)]
    if image_size % 2 ** (len(levels) - 1):
        raise ConventionError(
            f"{where}: init_convention.size {image_size} is not a multiple of {2 ** (len(levels) - 1)} "
            f"(the network halves its grid {len(levels) - 1} times); choose another size"
        )
    return UNetConfig(
        image_size=image_size,
        model_channels=ch,
        channel_mult=tuple(mults),
        num_res_blocks=next(iter(counts)),
        attention_resolutions=tuple(sorted({image_size // ds for ds in attention_ds}, reverse=True)),
        num_heads=num_heads,
        norm_groups=norm_groups,
        time_max_period=LUNG_DDPM_TIME_MAX_PERIOD,
    )


def legacy_qkv_to_ours(w: torch.Tensor, heads: int) -> torch.Tensor:
    """guided-diffusion's legacy qkv rows (heads x (q, k, v) x head_dim) -> ours ((q, k, v) x heads x head_dim).

    w: qkv conv weight [3 C, C, 1] or bias [3 C]; the identity for one head."""
    if heads == 1:
        return w
    return w.reshape(heads, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape).contiguous()


def _network_state(
    state: Mapping[str, Any], expected: Mapping[str, torch.Size], heads: int, where: str
) -> dict[str, torch.Tensor]:
    """Strict prefix strip: every ``denoise_fn.`` tensor onto a network tensor of the same shape, every other key
    a schedule buffer, every network tensor covered."""
    problems = [f"{k}: not a tensor ({type(v).__name__})" for k, v in state.items() if not torch.is_tensor(v)]
    net = {k.removeprefix(LUNG_DDPM_PREFIX): v for k, v in state.items() if k.startswith(LUNG_DDPM_PREFIX)}
    problems += [
        f"unexpected key {k}" for k in state if not k.startswith(LUNG_DDPM_PREFIX) and k not in SCHEDULE_BUFFERS
    ]
    problems += [f"missing key {LUNG_DDPM_PREFIX}{k}" for k in expected if k not in net]
    problems += [f"unexpected key {LUNG_DDPM_PREFIX}{k}" for k in net if k not in expected]
    problems += [
        f"{LUNG_DDPM_PREFIX}{k}: shape {list(v.shape)} in the file, {list(expected[k])} expected"
        for k, v in net.items()
        if k in expected and torch.is_tensor(v) and v.shape != expected[k]
    ]
    if problems:
        raise _fail(
            where,
            problems,
            "The file does not match the Lung-DDPM network read off its own shapes: it is damaged or not a "
            "Lung-DDPM checkpoint (torch.load(file)['ema'] must hold 'denoise_fn.*' weights and schedule buffers)",
        )
    out = {}
    for k in expected:
        v = net[k] if net[k].dtype == torch.float32 else net[k].float()
        out[k] = legacy_qkv_to_ours(v, heads) if k.endswith(("qkv.weight", "qkv.bias")) else v
    return out


def original_state_to_ours(
    state: Mapping[str, torch.Tensor], model: torch.nn.Module, heads: int, where: str
) -> dict[str, torch.Tensor]:
    """The original ``UNetModel``'s own state dict (no prefix) -> ``model``'s state dict, strictly checked."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    return _network_state({LUNG_DDPM_PREFIX + k: v for k, v in state.items()}, expected, heads, where)


def match_schedule(state: Mapping[str, Any], where: str) -> DiffusionConfig:
    """The :class:`DiffusionConfig` whose ``diffusers`` schedule reproduces the stored buffers (T from their length,
    betas and ``alphas_cumprod`` within :data:`SCHEDULE_TOLERANCE`); ε-prediction and L1, as Lung-DDPM."""
    if "betas" not in state:
        raise _fail(where, ["missing key betas"], "Lung-DDPM stores its schedule's buffers next to 'denoise_fn.*'")
    betas = state["betas"].double()
    T = int(betas.numel())
    bad = [
        f"{k}: shape {list(state[k].shape)}, expected [{T}]"
        for k in SCHEDULE_BUFFERS
        if k in state and state[k].shape != (T,)
    ]
    if bad:
        raise _fail(where, bad, "the schedule buffers must all have length T")
    for schedule in SCHEDULES:
        cfg = DiffusionConfig(timesteps=T, schedule=schedule, prediction="epsilon", loss="l1")
        sched = make_scheduler(cfg)
        ours = {"betas": sched.betas.double(), "alphas_cumprod": sched.alphas_cumprod.double()}
        if all(
            torch.allclose(state[k].double(), ours[k], rtol=rtol, atol=atol)
            for k, (rtol, atol) in SCHEDULE_TOLERANCE.items()
            if k in state
        ):
            return cfg
    raise _fail(
        where,
        [f"betas (T={T}) match neither of our schedules {list(SCHEDULES)} at T={T}"],
        "lungddpm's samplers need the training schedule; this file's cannot be reproduced",
    )


def convert(
    source: Mapping[str, Any],
    convention: LungDDPMConvention,
    num_heads: int = 1,
    norm_groups: int = 32,
    where: str = "checkpoint",
) -> dict[str, Any]:
    """A loaded Lung-DDPM checkpoint -> a lungddpm model checkpoint (``ema``, ``model``, ``step``, ``unet``,
    ``diffusion``, ``convention``; the caller adds ``source``). Raises :class:`CheckpointError` naming every
    missing, unexpected or mis-shaped key."""
    source = _unwrap(source, where)
    if isinstance(source, Mapping) and {"unet", "diffusion", "ema"} <= set(source):
        raise CheckpointError(
            f"{where}: already a lungddpm model checkpoint (it has 'unet' and 'diffusion'); give it as "
            "sample.checkpoint (or copy it to results/models/<train.name>/checkpoint.pt) instead of importing it"
        )
    if isinstance(source, Mapping) and "time_embed.0.weight" in source:  # denoise_fn.state_dict(): no schedule
        raise CheckpointError(
            f"{where}: a bare Lung-DDPM UNet state dict (no '{LUNG_DDPM_PREFIX}' names, no schedule buffers): the "
            "samplers need the schedule it was trained with; give the trainer's checkpoint (with 'ema' and 'model', "
            "e.g. Lung-DDPM-LIDC-IDRI-100000-steps.pt) or the GaussianDiffusion's own state_dict()"
        )
    if isinstance(source, Mapping) and any(str(k).startswith(LUNG_DDPM_PREFIX) for k in source):
        log.warning("%s: a bare GaussianDiffusion state dict ('%s*' at the top level): taken as its EMA weights",
                    where, LUNG_DDPM_PREFIX)  # fmt: skip
        source = {"ema": source}
    if not isinstance(source, Mapping) or not isinstance(source.get("ema"), Mapping):
        keys = sorted(map(str, source)) if isinstance(source, Mapping) else [type(source).__name__]
        shown = keys[:MAX_LISTED] + ([f"... and {len(keys) - MAX_LISTED} more"] if len(keys) > MAX_LISTED else [])
        raise CheckpointError(
            f"{where}: not a Lung-DDPM checkpoint (top level {shown}); expected the trainer's dict with 'ema' "
            "(and 'model', 'step') — e.g. Lung-DDPM-LIDC-IDRI-100000-steps.pt"
        )
    source = {**source, **{k: _unwrap(source[k], f"{where} [{k!r}]") for k in ("ema", "model") if k in source}}
    ema_state = source["ema"]
    net = {
        k.removeprefix(LUNG_DDPM_PREFIX): v
        for k, v in ema_state.items()
        if k.startswith(LUNG_DDPM_PREFIX) and torch.is_tensor(v)
    }
    unet = infer_unet_config(net, convention.size, num_heads, norm_groups, f"{where} ['ema']")
    try:
        with torch.device("meta"):
            expected = {k: v.shape for k, v in UNet3D(unet).state_dict().items()}
    except ValueError as exc:  # e.g. channels not divisible by num_heads
        raise ConventionError(f"{where}: {exc}; fix model.num_heads") from exc
    diffusion = match_schedule(ema_state, f"{where} ['ema']")
    ema = _network_state(ema_state, expected, num_heads, f"{where} ['ema']")
    if "model" in source:
        if match_schedule(source["model"], f"{where} ['model']") != diffusion:
            raise CheckpointError(f"{where}: 'model' and 'ema' hold different schedules; the file is inconsistent")
        model = _network_state(source["model"], expected, num_heads, f"{where} ['model']")
    else:
        log.warning("%s: no raw 'model' weights; the EMA weights stand in for them (sample.use_ema: false)", where)
        model = ema
    return {
        "ema": ema,
        "model": model,
        "step": int(source.get("step", 0)),
        "unet": asdict(unet),
        "diffusion": diffusion.to_dict(),
        "convention": convention.to_dict(),
        "size": list(convention.grid),
        "version": __version__,
    }


def import_lung_ddpm(
    src: Path, out: Path, convention: LungDDPMConvention, num_heads: int = 1, norm_groups: int = 32
) -> ImportSummary:
    """Convert the Lung-DDPM checkpoint ``src`` (loaded with ``weights_only=True``) into ``out``, atomically."""
    from ..io import file_sha256

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise CheckpointError(f"{src}: no such file; set model.init_from to the released Lung-DDPM checkpoint")
    if out.exists():  # never overwritten: the released file itself, a model trained here, an earlier import
        trained = (out.parent / "train_log.csv").is_file()
        what = ("the checkpoint being imported" if out.resolve() == src.resolve() else
                "a model trained here, train_log.csv beside it" if trained else "an earlier file")  # fmt: skip
        raise CheckpointError(f"{out}: exists ({what}); write the import to a new path, or delete it first")
    ckpt = convert(load_checkpoint(src), convention, num_heads, norm_groups, str(src))
    digest = file_sha256(src)
    ckpt["source"] = {"file": str(src), "sha256": digest, "format": "Lung-DDPM GaussianDiffusion state dict"}
    with atomic_path(out) as tmp:
        torch.save(ckpt, tmp)
    unet = UNetConfig(**ckpt["unet"])
    summary = ImportSummary(
        str(src),
        digest,
        ckpt["step"],
        len(ckpt["ema"]),
        sum(v.numel() for v in ckpt["ema"].values()),
        unet,
        DiffusionConfig(**ckpt["diffusion"]),
        time.perf_counter() - t0,
    )
    log.info(
        "%s (step %d, sha256 %s...): %d tensors, %d values, %s, %s, convention %s -> %s (%.1f s)",
        src,
        summary.step,
        digest[:12],
        summary.tensors,
        summary.parameters,
        unet,
        summary.diffusion,
        convention.to_dict(),
        out,
        summary.seconds,
    )
    return summary


def import_from_config(cfg: Config, src: Path, out: Path) -> ImportSummary:
    """:func:`import_lung_ddpm` with ``init_convention`` and ``model.num_heads`` / ``model.norm_groups`` from the
    config; the other ``model`` / ``diffusion`` keys train lungddpm's own models and are not used — where they
    differ from the imported file's, a warning says so (the file wins)."""
    convention = LungDDPMConvention.from_dict(cfg.raw["init_convention"])
    heads, groups = int(cfg.model["num_heads"]), int(cfg.model["norm_groups"])
    if (heads, groups) != LUNG_DDPM_HEADS_GROUPS:
        log.warning(
            "model.num_heads %d / model.norm_groups %d: the import converts the file's attention and GroupNorm with "
            "these, which its shapes cannot tell; Lung-DDPM's released network has %d head(s) and %d groups, and "
            "a mismatch changes every output (15-60 %% of its range in a test): set model.num_heads: %d and "
            "model.norm_groups: %d unless this file was trained otherwise",
            heads, groups, *LUNG_DDPM_HEADS_GROUPS, *LUNG_DDPM_HEADS_GROUPS,
        )  # fmt: skip
    summary = import_lung_ddpm(src, out, convention, heads, groups)
    imported = {
        "model.model_channels": summary.unet.model_channels,
        "model.channel_mult": list(summary.unet.channel_mult),
        "model.num_res_blocks": summary.unet.num_res_blocks,
        "model.attention_resolutions": list(summary.unet.attention_resolutions),
        "diffusion.timesteps": summary.diffusion.timesteps,
        "diffusion.schedule": summary.diffusion.schedule,
    }
    for key, theirs in imported.items():
        section, name = key.split(".")
        ours = cfg.raw[section][name]
        if ours != theirs:
            log.warning(
                "%s: config says %s, the imported checkpoint has %s; the checkpoint's is used", key, ours, theirs
            )
    if tuple(cfg.preprocess.size) != convention.grid:
        log.warning(
            "preprocess.size %s differs from the imported network's grid %s: every case is resized to it and back "
            "(set preprocess.size to %s to avoid resampling)",
            list(cfg.preprocess.size),
            list(convention.grid),
            list(convention.grid),
        )
    return summary
