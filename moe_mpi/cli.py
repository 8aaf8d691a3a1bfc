"""The ``moe-mpi`` command line (DESIGN.md section 5)."""
from __future__ import annotations

import json
import logging
import sys

import click

from .config import ModelConfig, preset_names

CONFIG_HELP = f"Preset name ({', '.join(preset_names())}) or a config.json path."


class UserError(click.ClickException):
    """An error the user can fix: printed as one line, exit status 2, no traceback."""
    exit_code = 2

    def format_message(self) -> str:
        return self.message


def _config(name: str) -> ModelConfig:
    try:
        return ModelConfig.load(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="moe-mpi")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Mixture-of-Experts inference with one expert of one MoE layer per MPI rank.

    Launch the main job with `mpiexec -n WORLD moe-mpi score IN.h5 OUT.h5`; `moe-mpi layout` tells
    WORLD for a config and a number of front ranks.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s moe-mpi %(levelname)s %(message)s", stream=sys.stderr)


@main.command()
@click.argument("input_path", metavar="IN.h5", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT.h5", type=click.Path(dir_okay=False))
@click.option("--config", "config", default=None, help=CONFIG_HELP + " [default: tiny]")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="Hugging Face DeepSeek-V3 checkpoint directory (config.json + *.safetensors).")
@click.option("--front-ranks", "-F", type=int, default=1, show_default=True,
              help="Front ranks (data-parallel over sequences); the world must be F + experts x MoE layers.")
@click.option("--micro-batch-tokens", "-T", type=int, default=2048, show_default=True,
              help="Padded tokens per micro-batch.")
@click.option("--in-flight", type=int, default=4, show_default=True, help="Micro-batches in flight per front.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--transport", type=click.Choice(["auto", "mpi", "mpi-staged", "nccl", "ipc"]), default="auto",
              show_default=True, help="How expert traffic moves (GPU runs); MPI always launches and controls.")
@click.option("--save-hidden", is_flag=True, help="Also write the final hidden states.")
@click.option("--save-routing", is_flag=True, help="Also write every token's chosen experts.")
@click.option("--resume", is_flag=True, help="Continue OUT.h5.partial, computing only sequences not done.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT.h5, or discard an unfinished OUT.h5.partial.")
@click.option("--trace", type=click.Path(dir_okay=False), default=None,
              help="Write a Chrome/Perfetto trace of every rank's compute, send and wait spans.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
@click.option("--deadline", type=float, default=300.0, show_default=True,
              help="Seconds a rank may wait on an exchange before it aborts the job, naming its peers.")
@click.option("--commit-interval", type=float, default=5.0, show_default=True,
              help="Seconds between commits of finished sequences to OUT.h5.partial (flush + fsync); a job "
                   "killed outright loses at most this much work, a signalled one none. 0: after every write.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def score(input_path, output_path, config, model, front_ranks, micro_batch_tokens, in_flight, dtype, device,
          transport, save_hidden, save_routing, resume, overwrite, trace, seed, deadline, commit_interval,
          no_progress):
    """Score IN.h5 (per-token log-probabilities) into OUT.h5, on one rank or under mpiexec."""
    from .runtime.job import ScoreOptions
    from .runtime.launch import launch

    opts = ScoreOptions(input=input_path, output=output_path, config=config, model=model,
                        front_ranks=front_ranks, micro_batch_tokens=micro_batch_tokens, in_flight=in_flight,
                        dtype=dtype, device=device, transport=transport, save_hidden=save_hidden,
                        save_routing=save_routing, resume=resume, overwrite=overwrite, trace=trace, seed=seed,
                        deadline=deadline, commit_interval=commit_interval, progress=not no_progress)
    sys.exit(launch(opts))


@main.command("make-inputs")
@click.argument("output_path", metavar="OUT.h5", type=click.Path(dir_okay=False))
@click.option("--config", "config", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--sequences", "-n", type=int, default=8, show_default=True)
@click.option("--seq-len", "-s", type=int, default=64, show_default=True)
@click.option("--ragged", is_flag=True, help="Random lengths in [1, seq-len] (a `lengths` dataset).")
@click.option("--activations", is_flag=True, help="Random activations [N, S, hidden] instead of tokens.")
@click.option("--act-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
def make_inputs_cmd(output_path, config, sequences, seq_len, ragged, activations, act_dtype, seed, overwrite):
    """Write a synthetic input file."""
    from .io.synthetic import make_inputs

    try:
        make_inputs(output_path, _config(config), sequences=sequences, seq_len=seq_len, ragged=ragged,
                    activations=activations, seed=seed, act_dtype=act_dtype, overwrite=overwrite)
    except (ValueError, OSError) as exc:
        raise UserError(f"make-inputs: {exc}") from None
    click.echo(f"wrote {output_path}: {sequences} sequences x {seq_len}"
               f"{' (ragged)' if ragged else ''} {'activations' if activations else 'tokens'}")


@main.command()
@click.option("--config", "config", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--front-ranks", "-F", type=int, default=1, show_default=True)
@click.option("--world-size", "world_only", is_flag=True, help="Print only the world size (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="The rank map as JSON.")
def layout(config, front_ranks, world_only, as_json):
    """World size and the rank -> (role, layer, expert) map."""
    from .parallel.topology import Layout

    cfg = _config(config)
    try:
        lay = Layout.of(cfg, front_ranks)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if world_only:
        click.echo(lay.world_size)
        return
    roles = [lay.role(r) for r in range(lay.world_size)]
    if as_json:
        click.echo(json.dumps({"world_size": lay.world_size, "front_ranks": lay.n_fronts,
                               "ranks": [r.__dict__ for r in roles]}))
        return
    click.echo(f"config {cfg.name}: {cfg.num_hidden_layers} layers ({cfg.first_k_dense_replace} dense, "
               f"{cfg.n_moe_layers} MoE) x {cfg.n_routed_experts} experts, top-{cfg.num_experts_per_tok}")
    click.echo(f"world size: {lay.world_size} = {lay.n_fronts} front + {cfg.n_moe_layers} x "
               f"{cfg.n_routed_experts} expert ranks   (mpiexec -n {lay.world_size} moe-mpi score ... "
               f"--front-ranks {lay.n_fronts})")
    shown = roles if len(roles) <= 64 else roles[:32] + [None] + roles[-8:]
    click.echo(f"{'rank':>6}  {'role':6}  {'front':>5}  {'moe layer':>9}  {'model layer':>11}  {'expert':>6}")
    for r in shown:
        if r is None:
            click.echo(f"{'...':>6}")
            continue
        def cell(v):
            return "-" if v is None else str(v)
        model_layer = None if r.layer is None else cfg.first_k_dense_replace + r.layer
        click.echo(f"{r.rank:>6}  {r.kind:6}  {cell(r.front):>5}  {cell(r.layer):>9}  {cell(model_layer):>11}  "
                   f"{cell(r.expert):>6}")


@main.command()
@click.argument("path", metavar="FILE.h5", type=click.Path(exists=True, dir_okay=False))
def inspect(path):
    """What an HDF5 file holds."""
    from .io.synthetic import describe

    try:
        click.echo(describe(path))
    except OSError as exc:
        raise UserError(f"{path}: cannot be read as HDF5 ({exc})") from None


@main.command("export-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--config", "config", default="tiny", show_default=True, help=CONFIG_HELP)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace the config.json and model.safetensors of an earlier export.")
def export_model(directory, config, seed, dtype, overwrite):
    """Write the seeded random weights as a Hugging Face checkpoint (config.json + model.safetensors)."""
    from .model.weights import export_checkpoint
    from .runtime.job import DTYPES

    cfg = _config(config)
    try:
        path = export_checkpoint(cfg, directory, seed=seed, dtype=DTYPES[dtype], overwrite=overwrite)
    except (ValueError, OSError) as exc:
        raise UserError(f"export-model: {exc}") from None
    click.echo(f"wrote {path}")


try:  # the performance model adds `plan` and `report`
    from .perf.cli import register as _register_perf
except ImportError:  # pragma: no cover - perf package not present
    _register_perf = None
if _register_perf is not None:
    _register_perf(main)


if __name__ == "__main__":
    main()
