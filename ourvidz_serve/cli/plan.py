"""``plan``: the GPU memory plan of a deployment profile (no GPU, no Ray needed).

Exit codes: 0 everything fits, 1 something does not fit, 2 the input is wrong (missing file,
bad YAML, unknown deployment or setting).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ourvidz_serve.cli.common import EXIT_NO, EXIT_OK, app
from ourvidz_serve.cli.common import console as _console
from ourvidz_serve.cli.common import fail as _fail

if TYPE_CHECKING:
    from ourvidz_serve.pipelines.memory_plan import MemoryPlan


@app.command(
    help="GPU memory plan of a deployment profile: does every replica fit its GPU share?\n\n"
    "Weights are counted from the real model configs on the meta device; activations are the "
    "documented estimates of ourvidz_serve.pipelines.memory_plan. Exits 1 when a replica "
    "needs more than its share (num_gpus x GPU memory) or a GPU's replicas need more than the "
    "GPU, 2 when the profile cannot be read."
)
def plan(
    profile_yaml: Annotated[
        Path,
        typer.Argument(
            help="A Ray Serve config for real hardware, e.g. deployments/ada-48gb.yaml",
            show_default=False,
        ),
    ],
    gpu_memory_gib: Annotated[
        float | None,
        typer.Option(
            "--gpu-memory-gib",
            help="Memory of one GPU in GiB (default: the config's gpu_memory_gib arg)",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the plan as JSON instead of tables")
    ] = False,
) -> None:
    """Print the plan; exit 0 when it fits, 1 when it does not, 2 on a bad profile."""
    # transformers warns about optional image backends on import; not this command's business.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ourvidz_serve.pipelines import memory_plan as mp

    try:
        profile = mp.read_profile(profile_yaml)
        result = mp.plan_profile(profile, gpu_memory_gib)
    except mp.ProfileError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        _print_plan(result)
    raise typer.Exit(EXIT_OK if result.fits else EXIT_NO)


def _print_plan(result: MemoryPlan) -> None:
    from ourvidz_serve.pipelines import memory_plan as mp

    console = _console()
    memory = "?" if result.gpu_memory_bytes is None else f"{mp.gib(result.gpu_memory_bytes)} GiB"
    console.print(
        f"[bold]{result.source}[/]: model profile [bold]{result.model_profile}[/], "
        f"GPU memory {memory} (GiB = 2^30 bytes)"
    )
    table = Table(title="Per replica", title_justify="left")
    for column in (
        "Deployment",
        "Replicas",
        "num_gpus",
        "Weights",
        "Activations (peak)",
        "Overhead",
        "Need",
        "Share",
        "Fits",
    ):
        right = column not in ("Deployment", "Activations (peak)", "Fits")
        table.add_column(column, justify="right" if right else "left")
    notes = []
    for plan in result.deployments:
        spec = plan.spec
        replicas = str(spec.replicas)
        if spec.max_replicas != spec.replicas:
            replicas = f"{spec.replicas}-{spec.max_replicas}"
        name = spec.name if spec.listed else f"{spec.name} (not listed)"
        need, share = plan.need, plan.share_bytes
        if need is None or share is None:
            where = "no GPU" if spec.name != mp.INGRESS else "no GPU (HTTP)"
            table.add_row(name, replicas, f"{spec.num_gpus:g}", "-", where, "-", "-", "-", "-")
            continue
        peak = f"{mp.gib(need.activation_bytes)} ({need.activations.peak_phase})"
        fits = "[green]yes[/]" if plan.fits else "[bold red]NO[/]"
        table.add_row(
            name,
            replicas,
            f"{spec.num_gpus:g}",
            mp.gib(need.weight_bytes),
            peak,
            mp.gib(need.overhead_bytes),
            mp.gib(need.total_bytes),
            mp.gib(share),
            fits,
        )
        notes.append(f"{spec.name}: {need.activations.assumptions}")
    console.print(table)
    for note in notes:
        console.print(f"  {note}", soft_wrap=True)
    console.print(
        f"  Overhead: CUDA context {mp.CUDA_CONTEXT_BYTES / mp.GIB:.2f} GiB per replica + "
        f"{mp.ACTIVATION_MARGIN:.0%} of the activations (fragmentation, workspaces). "
        "Share: min(num_gpus, 1) x GPU memory.",
        soft_wrap=True,
    )
    _print_gpus(console, "Per GPU, at start", result.gpus)
    if [g.replicas for g in result.gpus_at_max] != [g.replicas for g in result.gpus]:
        _print_gpus(console, "Per GPU, at max_replicas", result.gpus_at_max)
    if result.fits:
        console.print("[bold green]fits[/]: every replica fits its share and every GPU its sum")
    else:
        console.print("[bold red]does not fit[/]:")
        for problem in result.problems:
            console.print(f"  - {problem}", soft_wrap=True)


def _print_gpus(console: Console, title: str, gpus: tuple) -> None:
    from ourvidz_serve.pipelines import memory_plan as mp

    if not gpus:
        console.print(f"{title}: no replica holds a GPU")
        return
    table = Table(title=title, title_justify="left")
    for column in ("GPU", "Replicas", "num_gpus", "Planned", "Memory", "Free", "Fits"):
        right = column not in ("Replicas", "Fits")
        table.add_column(column, justify="right" if right else "left")
    for gpu in gpus:
        table.add_row(
            str(gpu.index),
            ", ".join(gpu.replicas),
            f"{gpu.fraction:.2f}",
            mp.gib(gpu.used_bytes),
            mp.gib(gpu.total_bytes),
            mp.gib(gpu.total_bytes - gpu.used_bytes),
            "[green]yes[/]" if gpu.fits else "[bold red]NO[/]",
        )
    console.print(table)
