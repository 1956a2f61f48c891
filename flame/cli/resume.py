"""`flame resume RUN_DIR`: continue an interrupted or finished run from its newest complete checkpoint.

flame resume exp/gla-340M-10B                  # after a preemption, a crash or Ctrl-C
flame resume exp/gla-340M-10B --steps 40960    # train further than planned
flame resume exp/gla-340M-10B --checkpoint step-00002000    # go back (the newer checkpoints are set aside)
accelerate launch --num_processes 8 -m flame resume exp/gla-340M-10B
"""

from typing import Annotated

import typer

from flame import ui
from flame.cli.train import DOCS, _render_result


def resume(
    run_dir: Annotated[str, typer.Argument(help="The run dir (the --path of `flame train`).", show_default=False)],
    steps: Annotated[int | None, typer.Option("--steps", help="Train up to this many updates in all.")] = None,
    logging: Annotated[int | None, typer.Option("--logging", help=DOCS["logging"])] = None,
    save: Annotated[int | None, typer.Option("--save", help=DOCS["save"])] = None,
    limit: Annotated[int | None, typer.Option("--limit", help=DOCS["limit"])] = None,
    project: Annotated[str | None, typer.Option("--project", help=DOCS["project"])] = None,
    tensorboard: Annotated[
        bool | None,
        typer.Option(
            "--tensorboard/--no-tensorboard",
            help=f"{DOCS['tensorboard']} Default: as the run was started.",
            show_default=False,
        ),
    ] = None,
    max_bad_steps: Annotated[int | None, typer.Option("--max-bad-steps", help=DOCS["max_bad_steps"])] = None,
    eval: Annotated[int | None, typer.Option("--eval", help=DOCS["eval"])] = None,
    eval_windows: Annotated[int | None, typer.Option("--eval-windows", help=DOCS["eval_windows"])] = None,
    cuda_graphs: Annotated[
        bool | None,
        typer.Option(
            "--cuda-graphs/--no-cuda-graphs",
            help=f"{DOCS['cuda_graphs']} Default: as the run was started.",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Continue even though the run's dataset changed since the checkpoint."),
    ] = False,
    cache: Annotated[
        str | None,
        typer.Option(
            "--cache",
            help="The run's prepared dataset(s) at a new place (moved or copied); checked against the checkpoint's "
            "data (documents and tokens of each), so other data needs --force.",
            show_default=False,
        ),
    ] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            help="Go back to this earlier checkpoint of the run (step-N, e.g. when the newest is damaged or "
            "diverged); the newer ones are moved to RUN/set-aside/, never deleted.",
            show_default=False,
        ),
    ] = None,
):
    """Continue a run from its newest complete checkpoint, with the configuration it saved.

    Restored: weights, optimizer moments, LR schedule, RNG of every process, data position, tokens seen, wandb run.

    Only how long to train, how to log, evaluate and checkpoint, and whether to replay CUDA graphs may change; model,
    data, batch and seed stay as started.
    """
    from flame import engine

    overrides = dict(steps=steps, logging=logging, save=save, limit=limit, project=project, max_bad_steps=max_bad_steps)
    overrides |= dict(eval=eval, eval_windows=eval_windows, cuda_graphs=cuda_graphs, tensorboard=tensorboard)
    overrides |= dict(cache=cache)
    result = engine.resume(run_dir, overrides, force=force, checkpoint=checkpoint)
    if ui.is_main_process():
        _render_result(result)
