"""Planning a scaling sweep: the runs of a sweep config, each with its validated training config.

A sweep config is a `get_config(arg)` file with three groups:

* ``base``: a complete training config (the groups of experiments/gpt_tiny.py). Every run
  starts from it.
* ``sweep``: the plan. ``mode='grid'`` crosses the width ladder with the token budgets
  ``tokens``; ``mode='isoflop'`` takes compute budgets ``flops`` and, for each budget C and
  each size N, trains on D = C / (6 N) tokens, rounded to whole steps. N counts every
  parameter, embeddings included (Hoffmann et al. 2022), so results.csv's ``flops`` column
  is exactly 6·N·D. For a mixture of experts N is the active count ``params_active`` (the
  parameters one token uses: k of the E experts), in the budgets, the flops and the fits.
* ``families``: optional overlays that put more model families on the same ladder, e.g.
  ``families.lstm.base.model = rnn.model_config('tiny')`` and
  ``families.lstm.sweep.num_layers = 2``. ``base.model`` is replaced whole; every other key
  is merged into ``base`` / ``sweep`` and must already exist there.

Size rules (all in ``sweep``):

* width ladder ``widths``; depth ``num_layers``, or when that is 0,
  ``max(1, round(width / aspect_ratio))``; GPT heads ``width // head_dim``; an RNN's
  embedding and recurrent widths both equal the width.
* learning rate ``base.optim.learning_rate * (base_width / width) ** lr_exponent``
  (lr ∝ 1/width for Adam, as in μP, with ``lr_exponent = 1``; 0 keeps one rate, which is
  what a GPT with ``model.mup=True`` needs: the trainer then scales the hidden rates itself),
  times ``(base_tokens / tokens) ** lr_tokens_exponent`` (0 by default: one rate for every
  budget; a positive exponent lowers the rate of longer runs).
* weight decay ``base.optim.weight_decay`` for every run, or when ``independent_weight_decay``
  is positive, ``independent_weight_decay / learning_rate``: optax's AdamW shrinks the decayed
  matrices by learning_rate × weight_decay a step, so coupled decay shrinks the small, fast-learning
  models of a width ladder many times faster than the wide ones, and the more so the longer they
  train; holding the product fixed (Wortsman et al. 2023's independent weight decay) gives every
  run the same shrink per step at the peak of its schedule. (With ``model.mup`` the trainer
  divides the hidden matrices' rates by the width multiplier; the rule sees the base rate.)
* warmup ``round(warmup_fraction * steps)`` (at least 1), or ``base.optim.warmup_steps``
  when the fraction is 0. The batch size is the base's for every run, so a run's tokens
  are ``steps * batch_size * seq_len``, and the cosine schedule of every run ends at its
  own last step.
* ``max_flops``: planned runs whose 6·N·D exceeds it are left out (0: no cap), so a grid can
  give small models long budgets without its largest model taking them all.
* ``tokens_per_param``: ``(low, high)`` keeps the runs whose D / N lies in that band (() or 0
  for a bound: none), so isoFLOP profiles can stay near the compute-optimal ratio instead of
  spending budgets on sizes far from it.
* ``run_overrides``: ``'PATTERN:key=value'`` strings applied to runs whose id matches the
  shell pattern, e.g. ``'gpt_w512_*:train.grad_accum=2'``.

A size whose config is invalid becomes a run with an `error` (recorded as failed), not an
exception: the other sizes still run.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_collections

from bigmodel import config as config_lib, storage
from bigmodel.config import ConfigError

LADDER_FIELDS = {  # model family -> the fields a (width, depth) point sets
    "gpt": ("d_model", "num_heads", "num_layers"),
    "rnn": ("d_model", "hidden", "num_layers"),
}


@dataclasses.dataclass(eq=False)  # runs compare by identity
class Run:
    """One planned training run."""

    index: int  # position in the plan; what `--only` and array task ids refer to
    id: str
    family: str  # label in sweep.families (the `model` column)
    width: int
    depth: int
    steps: int
    tokens: int  # steps * batch_size * seq_len
    params: int  # N with embeddings
    params_nonembed: int
    params_active: int  # N a token uses: params unless a mixture of experts (then k of E experts)
    learning_rate: float
    weight_decay: float
    budget_tokens: float | None  # grid: the requested token budget
    budget_flops: float | None  # isoflop: the requested compute budget C
    config: ml_collections.ConfigDict | None = dataclasses.field(repr=False, default=None)
    error: str = ""  # why the run's config is invalid ('' when it is fine)

    @property
    def flops(self) -> int:
        """Training compute 6·N·D with N the active parameters including embeddings."""
        return 6 * self.params_active * self.tokens


@dataclasses.dataclass
class Sweep:
    """A loaded sweep config, its plan and where it runs."""

    spec: str  # 'path.py[:arg]' as given
    overrides: list[str]
    workdir: Path
    config: ml_collections.ConfigDict
    runs: list[Run]
    # For a sweep in a bucket (gs://, s3://): its URL. `workdir` is then a local folder for the
    # sweep's own files (results.csv, fit/, run configs, logs), uploaded there after each change,
    # while each run trains with its workdir in the bucket.
    remote: str | None = None

    def run_dir(self, run: Run) -> Path:
        """The folder of one run's sweep files (and, for a local sweep, its workdir)."""
        return self.workdir / "runs" / run.id

    def train_dir(self, run: Run) -> Path | str:
        """The workdir `bigmodel train` gets for one run: in the bucket for a sweep in one."""
        return f"{self.remote}/runs/{run.id}" if self.remote else self.run_dir(run)

    def upload(self) -> None:
        """Copy the sweep's own files to the bucket (nothing to do for a local sweep)."""
        if self.remote:
            storage.upload_tree(self.workdir, self.remote, skip=(".results.lock",))


def load_sweep_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Load a sweep config file and check it has base, sweep and families groups."""
    config = config_lib.load(spec, overrides)
    for group in ("base", "sweep", "families"):
        if group not in config:
            raise ConfigError(f"{spec} has no {group!r} group; a sweep config needs base, sweep and families")
    if config.sweep.mode not in ("grid", "isoflop"):
        raise ConfigError(f"config.sweep.mode={config.sweep.mode!r}; use 'grid' or 'isoflop'")
    config_lib.check_values(config)
    return config


def _copy(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An unlocked deep copy."""
    return ml_collections.ConfigDict(cfg.to_dict())


def _merge(target: ml_collections.ConfigDict, overlay: ml_collections.ConfigDict, where: str) -> None:
    """Merge overlay into target key by key; `model` groups are replaced whole."""
    for key, value in overlay.items():
        if key not in target:
            raise ConfigError(f"config.{where}.{key} does not exist in the config it overlays; "
                              f"valid keys: {', '.join(sorted(target.keys()))}")
        if isinstance(value, ml_collections.ConfigDict) and key != "model":
            _merge(target[key], value, f"{where}.{key}")
        else:
            target[key] = _copy(value) if isinstance(value, ml_collections.ConfigDict) else value


def resolve_family(config: ml_collections.ConfigDict,
                   label: str) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """(base, sweep) for one family: the config's groups with that family's overlay merged in."""
    base, sweep = _copy(config.base), _copy(config.sweep)
    if label in config.families:
        overlay = config.families[label]
        unknown = set(overlay.keys()) - {"base", "sweep"}
        if unknown:
            raise ConfigError(f"config.families.{label} may only hold 'base' and 'sweep', not {sorted(unknown)}")
        if "base" in overlay:
            _merge(base, overlay.base, f"families.{label}.base")
        if "sweep" in overlay:
            _merge(sweep, overlay.sweep, f"families.{label}.sweep")
    return base, sweep


def depth_for(sweep: ml_collections.ConfigDict, width: int) -> int:
    """Layers at a width: sweep.num_layers, or width / aspect_ratio rounded when that is 0."""
    if sweep.num_layers > 0:
        return int(sweep.num_layers)
    return max(1, round(width / sweep.aspect_ratio))


def sized_model(model: ml_collections.ConfigDict, width: int, depth: int, head_dim: int) -> ml_collections.ConfigDict:
    """The model group at one point of the width/depth ladder."""
    if model.name not in LADDER_FIELDS:
        raise ConfigError(f"config.base.model.name={model.name!r} has no width ladder; sweeps support "
                          f"{sorted(LADDER_FIELDS)}")
    model = _copy(model)
    model.num_layers = depth
    model.d_model = width
    if model.name == "gpt":
        if width % head_dim:
            raise ConfigError(f"width {width} is not a multiple of config.sweep.head_dim={head_dim}; "
                              "choose widths that are multiples of the head dimension")
        model.num_heads = width // head_dim
    else:
        model.hidden = width
    model.size = f"w{width}_l{depth}"
    return model


_PARAM_CACHE: dict[str, tuple[int, int, int]] = {}


def count_params(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(all, embedding, inactive expert) parameters of config.model, counted as the trainer does."""
    key = json.dumps([config.model.to_dict(), config.data.seq_len], sort_keys=True, default=str)
    if key not in _PARAM_CACHE:
        import jax
        import jax.numpy as jnp

        from bigmodel import flops, models

        module = models.build(config.model)
        tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)  # every ladder family is a token LM
        # eval_shape traces the init without allocating, so any size is counted for free.
        variables = jax.eval_shape(
            lambda rng: module.init({"params": rng, "dropout": rng}, tokens, train=False), jax.random.key(0))
        params = variables["params"]
        _PARAM_CACHE[key] = (flops.param_count(params), flops.embedding_param_count(params),
                             flops.inactive_param_count(params, config.model))
    return _PARAM_CACHE[key]


def steps_for(tokens: float, tokens_per_step: int) -> int:
    """Whole optimizer steps closest to a token budget (at least one)."""
    return max(1, round(tokens / tokens_per_step))


def learning_rate_for(base_lr: float, sweep: ml_collections.ConfigDict, width: int, tokens: float) -> float:
    """base_lr * (base_width / width) ** lr_exponent * (base_tokens / tokens) ** lr_tokens_exponent."""
    lr = base_lr * (sweep.base_width / width) ** sweep.lr_exponent
    if sweep.lr_tokens_exponent:
        lr *= (sweep.base_tokens / tokens) ** sweep.lr_tokens_exponent
    return float(lr)


def weight_decay_for(base_decay: float, sweep: ml_collections.ConfigDict, learning_rate: float) -> float:
    """independent_weight_decay / learning_rate when that is positive, else the base config's weight decay."""
    if sweep.independent_weight_decay > 0:
        return float(sweep.independent_weight_decay / learning_rate)
    return float(base_decay)


def warmup_for(base_warmup: int, sweep: ml_collections.ConfigDict, steps: int) -> int:
    """round(warmup_fraction * steps), at least 1; the base warmup when the fraction is 0."""
    if sweep.warmup_fraction > 0:
        return max(1, round(sweep.warmup_fraction * steps))
    return int(base_warmup)


def human(n: float, digits: int = 2) -> str:
    """2.6M, 410k, 1.2G: a count rounded to `digits` significant digits with an SI suffix."""
    if n <= 0:
        return str(n)
    n = round(n, digits - 1 - math.floor(math.log10(n)))
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)):
        if n >= scale or not suffix:
            return f"{n / scale:.{digits + 3}g}{suffix}"
    raise AssertionError("unreachable")


def _assign_ids(runs: list[Run]) -> None:
    """Readable unique ids, family_wWIDTH_lDEPTH_tTOKENS, with more digits if two would clash."""
    for digits in range(2, 8):
        ids = [f"{r.family}_w{r.width}_l{r.depth}_t{human(r.tokens, digits)}" for r in runs]
        if len(set(ids)) == len(ids):
            break
    else:
        ids = [f"{r.family}_w{r.width}_l{r.depth}_t{r.tokens}_{i}" for i, r in enumerate(runs)]
    for run, run_id in zip(runs, ids):
        run.id = run_id


def _apply_run_overrides(cfg: ml_collections.ConfigDict, run_id: str, overrides: Sequence[str]) -> None:
    """Apply the sweep.run_overrides entries whose pattern matches run_id."""
    for item in overrides:
        pattern, sep, assignment = item.partition(":")
        key, eq, value = assignment.partition("=")
        if not (sep and eq):
            raise ConfigError(f"config.sweep.run_overrides entry {item!r}; write 'PATTERN:key.path=value'")
        if fnmatch.fnmatchcase(run_id, pattern):
            config_lib.apply_override(cfg, key, value)


def _in_band(ratio: float, band: Sequence[float]) -> bool:
    """Whether a run's tokens per parameter lie in sweep.tokens_per_param = (low, high); 0 or () for no bound."""
    if not band:
        return True
    if len(band) != 2:
        raise ConfigError(f"config.sweep.tokens_per_param={tuple(band)!r}; give (low, high), 0 for no bound, "
                          "or () for no band")
    low, high = band
    if low < 0 or high < 0 or (low and high and high < low):
        raise ConfigError(f"config.sweep.tokens_per_param={tuple(band)!r}; bounds are >= 0 (0: none) with "
                          "low <= high")
    return (not low or ratio >= low) and (not high or ratio <= high)


def _family_points(base: ml_collections.ConfigDict, sweep: ml_collections.ConfigDict, label: str) -> Iterator[Run]:
    """Runs of one family before ids, overrides and validation; a bad size yields runs with an error."""
    if "mup" in base.model and base.model.mup and sweep.lr_exponent != 0:
        raise ConfigError(f"config.sweep.lr_exponent={sweep.lr_exponent} with model.mup=True would scale the "
                          "learning rate with width twice (muP already divides the hidden-matrix rates); "
                          "set --config.sweep.lr_exponent=0")
    tokens_per_step = base.train.batch_size * base.data.seq_len
    budgets = sweep.tokens if sweep.mode == "grid" else sweep.flops
    if not budgets:
        raise ConfigError(f"config.sweep.{'tokens' if sweep.mode == 'grid' else 'flops'} is empty; "
                          f"mode {sweep.mode!r} needs at least one budget")
    for budget in budgets:
        for width in sweep.widths:
            depth = depth_for(sweep, width)
            cfg, error, params, embed, inactive = _copy(base), "", 0, 0, 0
            try:
                cfg.model = sized_model(base.model, width, depth, sweep.head_dim)
                params, embed, inactive = count_params(cfg)
            except (ConfigError, ValueError, TypeError) as e:
                error = f"config error: {e}"
            active = params - inactive  # the N of 6ND and of tokens per parameter
            if sweep.mode == "grid":
                steps = steps_for(budget, tokens_per_step)
            else:
                steps = steps_for(budget / (6.0 * active), tokens_per_step) if params else 0
            tokens = steps * tokens_per_step
            if not error and steps < sweep.min_steps:
                continue  # too short to mean anything (isoFLOP budgets spanning many sizes)
            if not error and sweep.max_flops and 6 * active * tokens > sweep.max_flops:
                continue  # over the compute cap: a grid that gives the largest models fewer budgets
            if not error and not _in_band(tokens / active, sweep.tokens_per_param):
                continue  # outside the tokens-per-parameter band
            lr = learning_rate_for(base.optim.learning_rate, sweep, width, tokens)
            yield Run(
                index=-1, id="", family=label, width=int(width), depth=depth, steps=steps,
                tokens=tokens, params=params, params_nonembed=params - embed, params_active=active,
                learning_rate=lr,
                weight_decay=weight_decay_for(base.optim.weight_decay, sweep, lr),
                budget_tokens=budget if sweep.mode == "grid" else None,
                budget_flops=budget if sweep.mode == "isoflop" else None,
                config=cfg, error=error,
            )


def _finish_config(run: Run, sweep: ml_collections.ConfigDict, num_devices: int) -> None:
    """Set the run's planned values on its config, apply run_overrides, validate; errors go to run.error."""
    cfg = run.config
    cfg.train.steps = run.steps
    cfg.optim.learning_rate = run.learning_rate
    cfg.optim.weight_decay = run.weight_decay
    cfg.optim.warmup_steps = warmup_for(cfg.optim.warmup_steps, sweep, run.steps)
    # Each run's cosine ends at its own last step: a schedule longer than the run
    # overstates its loss (Hoffmann et al. 2022, fig. A1).
    cfg.optim.decay_steps = 0
    cfg.log.progress = False  # the sweep prints its own progress lines
    try:
        _apply_run_overrides(cfg, run.id, sweep.run_overrides)
        cfg.lock()
        config_lib.validate(cfg, num_devices)
    except ConfigError as e:
        run.error = f"config error: {e}"
    # run_overrides may change what the plan set; the table reports what will run.
    run.steps, run.learning_rate, run.weight_decay = cfg.train.steps, cfg.optim.learning_rate, cfg.optim.weight_decay
    run.tokens = run.steps * cfg.train.batch_size * cfg.data.seq_len


def plan(config: ml_collections.ConfigDict, num_devices: int) -> list[Run]:
    """Every run of a sweep config, in a fixed order, each with its validated training config."""
    runs: list[Run] = []
    for label in config.sweep.families:
        base, sweep = resolve_family(config, label)
        family_runs = list(_family_points(base, sweep, label))
        _assign_ids(family_runs)
        for run in family_runs:
            if not run.error:
                _finish_config(run, sweep, num_devices)
        runs += family_runs
    if not runs:
        raise ConfigError("the sweep plans no runs; check config.sweep.widths, the budgets and min_steps")
    for i, run in enumerate(runs):
        run.index = i
    if len({r.id for r in runs}) != len(runs):
        raise ConfigError("two families share a label; give every entry of config.sweep.families its own name")
    return runs


def select(runs: Sequence[Run], only: str) -> Run:
    """The run named by --only: a plan index or a run id."""
    if only.isdigit() and int(only) < len(runs):
        return runs[int(only)]
    for run in runs:
        if run.id == only:
            return run
    raise ConfigError(f"--only {only!r} names no run; use 0..{len(runs) - 1} or a run id from results.csv")


def print_plan(runs: Sequence[Run]) -> None:
    """The planned runs as a table."""
    print(f"{'#':>3}  {'run':<28}{'params':>9}{'tokens':>9}{'steps':>7}{'6ND':>10}{'lr':>9}{'wd':>8}  problem")
    for r in runs:
        print(f"{r.index:>3}  {r.id:<28}{human(r.params) if r.params else '?':>9}{human(r.tokens):>9}"
              f"{r.steps:>7}{r.flops:>10.3g}{r.learning_rate:>9.3g}{r.weight_decay:>8.3g}  {r.error}")
    total = sum(r.flops for r in runs)
    print(f"{len(runs)} runs, {human(sum(r.tokens for r in runs))} tokens, {total:.3g} FLOPs (6ND) in all")


def load(spec: str, overrides: Sequence[str], workdir: str | Path, num_devices: int | None = None) -> Sweep:
    """Load and plan a sweep (num_devices: what each run will see; default this machine's)."""
    config = load_sweep_config(spec, overrides)
    if num_devices is None:
        import jax

        num_devices = jax.device_count()
    if storage.is_remote(workdir):
        return Sweep(spec, list(overrides), storage.cache_dir(str(workdir)) / "sweep", config,
                     plan(config, num_devices), remote=str(workdir).rstrip("/"))
    return Sweep(spec, list(overrides), Path(workdir), config, plan(config, num_devices))
