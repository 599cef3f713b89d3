"""Expert-parallel test cases, their inputs, and the worker that runs them on one rank.

``tests/test_distributed.py`` launches ``python tests/ep_cases.py --rank R --world-size W --dir DIR``
once per rank.  The worker joins a gloo group (file rendezvous in DIR, so no port can clash), runs
every sub-case of :func:`cases` on the one process group, and saves its outputs and gradients to
``DIR/rank{R}.pt``.  The test process rebuilds the same global inputs from :func:`make_inputs`
and compares them with the float64 reference.  Both sides import this file, so the cases and the
inputs cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import zlib
from dataclasses import dataclass
from datetime import timedelta

import torch

NUM_EXPERTS, TOP_K, DIM, INTER = 8, 3, 8, 6
ACTIVATIONS = ("swiglu", "quick_geglu", "relu2")
NEMO_ACTIVATIONS = ("swigluoai", "geglu")
PARAM_NAMES = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")
GLOO_TIMEOUT_S = 60

# Tokens per rank: uneven counts, and uneven counts with one rank holding none.
TOKEN_LAYOUTS = {
    2: {"uneven": (5, 8), "empty_rank": (0, 7)},
    4: {"uneven": (4, 7, 2, 5), "empty_rank": (6, 0, 3, 5)},
}
# A module spec is "Class" (apply_ep's default transport for it) or "Class@transport".  "@peer" is
# apply_ep(max_tokens_per_rank=PEER_CAPACITY), the static-shape peer-memory dispatch (on gloo its peer
# loads are stood in for by an all-gather).
PEER_CAPACITY = 9  # above every layout's largest rank, so receivers hold padding rows
TRANSPORT_OPTIONS = {"all_gather": {"transport": "all_gather"}, "all_to_all": {"transport": "all_to_all"},
                     "peer": {"max_tokens_per_rank": PEER_CAPACITY}}
# Every activation, with and without bias, both layouts, compiled too.
MODULES = ("GroupedExperts", "GroupedExpertsDeepEP", "GroupedExpertsDeepEP@peer")
# Every module over every transport gloo carries (GroupedExpertsTE on the CPU stand-in of Transformer
# Engine): one activation with bias, both layouts, compiled too.
TRANSPORT_MATRIX = ("GroupedExperts@all_to_all", "GroupedExperts@peer", "GroupedExpertsDeepEP@all_gather",
                    "GroupedExpertsTE@all_gather", "GroupedExpertsTE@all_to_all", "GroupedExpertsTE@peer")


@dataclass(frozen=True)
class Case:
    module: str
    activation: str
    bias: bool
    layout: str
    compiled: bool = False

    @property
    def name(self) -> str:
        mode = "compiled" if self.compiled else "eager"
        return f"{self.module}-{self.activation}-{'bias' if self.bias else 'nobias'}-{self.layout}-{mode}"

    def eager(self) -> "Case":
        return Case(self.module, self.activation, self.bias, self.layout, False)


def cases(world_size: int) -> list[Case]:
    eager = [Case(m, a, b, layout) for m in MODULES for a in ACTIVATIONS for b in (False, True)
             for layout in TOKEN_LAYOUTS[world_size]]
    eager += [Case(m, "quick_geglu", True, layout) for m in TRANSPORT_MATRIX for layout in TOKEN_LAYOUTS[world_size]]
    # NeMo's two other activations (issue 18), with bias, on every module spec's default of MODULES.
    eager += [Case(m, a, True, layout) for m in MODULES for a in NEMO_ACTIVATIONS for layout in TOKEN_LAYOUTS[world_size]]
    # torch.compile(fullgraph=True) of every module spec on the hardest layout (a rank with no token).
    compiled = [Case(m, "quick_geglu", True, "empty_rank", compiled=True) for m in MODULES + TRANSPORT_MATRIX]
    return eager + compiled


def token_counts(case: Case, world_size: int) -> tuple[int, ...]:
    return TOKEN_LAYOUTS[world_size][case.layout]


def config(activation: str, bias: bool, dtype=torch.float32, num_experts: int = NUM_EXPERTS):
    from moe_modules import MoEConfig

    return MoEConfig(n_routed_experts=num_experts, n_activated_experts=TOP_K, dim=DIM, moe_inter_dim=INTER,
                     expert_activation=activation, expert_bias=bias, dtype=dtype)


def make_inputs(case: Case, world_size: int) -> dict:
    """The global (all ranks' tokens, concatenated in rank order) float32 inputs of a case."""
    seed = zlib.crc32(f"{case.activation}-{case.bias}-{case.layout}-{world_size}".encode())  # same in every process
    gen = torch.Generator().manual_seed(seed)
    T = sum(token_counts(case, world_size))
    up = INTER * (1 if case.activation == "relu2" else 2)
    scores = torch.rand(T, NUM_EXPERTS, generator=gen)
    indices = scores.topk(TOP_K, dim=1).indices
    indices[torch.rand(T, TOP_K, generator=gen) < 0.15] = -1  # some slots not routed
    token_mask = torch.rand(T, generator=gen) > 0.2  # some tokens dropped
    inputs = {
        "x": torch.randn(T, DIM, generator=gen),
        "token_mask": token_mask,
        "weights": torch.rand(T, TOP_K, generator=gen) + 0.1,
        "indices": indices,
        "grad_y": torch.randn(T, DIM, generator=gen),
        "gate_and_up_projs": torch.randn(NUM_EXPERTS, DIM, up, generator=gen) * 0.4,
        "down_projs": torch.randn(NUM_EXPERTS, INTER, DIM, generator=gen) * 0.4,
        "gate_up_proj_bias": torch.randn(NUM_EXPERTS, up, generator=gen) * 0.3 if case.bias else None,
        "down_proj_bias": torch.randn(NUM_EXPERTS, DIM, generator=gen) * 0.3 if case.bias else None,
    }
    return inputs


def rank_slice(case: Case, world_size: int, rank: int) -> slice:
    counts = token_counts(case, world_size)
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def expert_slice(world_size: int, rank: int) -> slice:
    per_rank = NUM_EXPERTS // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


# ---- the worker ---------------------------------------------------------------------------


def new_module(module_name: str, cfg):
    import moe_modules

    return getattr(moe_modules, module_name.split("@")[0])(cfg)


def ep_options(module_name: str) -> dict:
    _, _, transport = module_name.partition("@")
    return TRANSPORT_OPTIONS[transport] if transport else {}


def build_module(module_name: str, cfg, params: dict, mesh):
    """A module holding ``params`` (full tensors, identical on every rank), sharded by ``apply_ep``."""
    import moe_modules

    module = new_module(module_name, cfg)
    module.load_state_dict({name: params[name] for name in PARAM_NAMES if params[name] is not None})
    return moe_modules.apply_ep(module, mesh, **ep_options(module_name))


def local_grads(module) -> dict:
    """The gradients of this rank's experts in the stacked layout, ``{name + "_grad": [E_local, ...]}``."""
    from moe_modules.te import GroupedExpertsTE, layout

    grads = {}
    if isinstance(module, GroupedExpertsTE):  # per-expert TE parameters: weight{i} [out, in], bias{i}
        for name, linear in (("gate_and_up_projs", module.gate_up_linear), ("down_projs", module.down_linear)):
            n = linear.num_gemms
            grads[name + "_grad"] = layout.stacked_from_te_weights([getattr(linear, f"weight{i}").grad
                                                                    for i in range(n)])
            if module.config.expert_bias:
                bias = "gate_up_proj_bias" if name == "gate_and_up_projs" else "down_proj_bias"
                grads[bias + "_grad"] = layout.stacked_from_te_biases([getattr(linear, f"bias{i}").grad
                                                                       for i in range(n)])
        return grads
    for name in PARAM_NAMES:
        p = getattr(module, name)
        if p is not None:
            grads[name + "_grad"] = None if p.grad is None else p.grad.to_local()
    return grads


def run_case(case: Case, mesh, rank: int, world_size: int) -> tuple[dict, str]:
    """This rank's output and gradients, and the name of the dispatcher apply_ep gave the module."""
    inputs = make_inputs(case, world_size)
    module = build_module(case.module, config(case.activation, case.bias), inputs, mesh)
    forward = torch.compile(module, fullgraph=True, backend="aot_eager") if case.compiled else module
    mine = rank_slice(case, world_size, rank)
    x = inputs["x"][mine].clone().requires_grad_()
    weights = inputs["weights"][mine].clone().requires_grad_()
    y = forward(x, inputs["token_mask"][mine], weights, inputs["indices"][mine])
    (y * inputs["grad_y"][mine]).sum().backward()
    result = {"y": y.detach(), "x_grad": x.grad, "weights_grad": weights.grad, **local_grads(module)}
    return result, type(module.token_dispatcher).__name__


def check_state_dict_round_trip(mesh, rank: int, world_size: int, directory: str) -> list[str]:
    """apply_ep keeps the state-dict keys; values are Shard(0) DTensors whose full_tensor() is the
    single-device tensor; torch.distributed.checkpoint saves and loads them.  Returns failures."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    failures = []
    for module_name in MODULES:
        case = Case(module_name, "swiglu", True, "uneven")
        saved = make_inputs(case, world_size)
        cfg = config("swiglu", True)
        single = new_module(module_name, cfg)
        module = build_module(module_name, cfg, saved, mesh)
        state = module.state_dict()
        if list(state) != list(single.state_dict()):
            failures.append(f"{module_name}: keys {list(state)} != single-device keys {list(single.state_dict())}")
        for name, value in state.items():
            if not isinstance(value, DTensor) or tuple(value.placements) != (Shard(0),):
                failures.append(f"{module_name}.{name}: expected a Shard(0) DTensor, got {type(value).__name__}")
            elif not torch.equal(value.full_tensor(), saved[name]):
                failures.append(f"{module_name}.{name}: full_tensor() differs from the single-device tensor")
            elif not torch.equal(value.to_local(), saved[name][expert_slice(world_size, rank)]):
                failures.append(f"{module_name}.{name}: the local shard is not this rank's experts")
        checkpoint = os.path.join(directory, f"checkpoint_{module_name}")
        dcp.save(state, checkpoint_id=checkpoint)

        other = make_inputs(Case(module_name, "swiglu", True, "empty_rank"), world_size)
        restored = build_module(module_name, cfg, other, mesh)
        loaded = restored.state_dict()
        dcp.load(loaded, checkpoint_id=checkpoint)
        restored.load_state_dict(loaded)
        for name in PARAM_NAMES:
            full = getattr(restored, name).full_tensor()
            if not torch.equal(full, saved[name]):
                failures.append(f"{module_name}.{name}: differs after a dcp save/load round trip")
    return failures


def submesh_cases() -> list[Case]:
    """Cases run at world size 4 on the "ep" dimension of a (dp=2, ep=2) mesh, with world-2 layouts."""
    return [Case(m, "quick_geglu", True, "empty_rank") for m in MODULES]


def check_reshard_load(ep_mesh, saved_world_size: int, directory: str) -> list[str]:
    """Load the checkpoints saved over all ranks into modules sharded over a smaller EP mesh."""
    import torch.distributed.checkpoint as dcp

    failures = []
    for module_name in MODULES:
        saved = make_inputs(Case(module_name, "swiglu", True, "uneven"), saved_world_size)
        other = make_inputs(Case(module_name, "swiglu", True, "empty_rank"), saved_world_size)
        restored = build_module(module_name, config("swiglu", True), other, ep_mesh)
        loaded = restored.state_dict()
        dcp.load(loaded, checkpoint_id=os.path.join(directory, f"checkpoint_{module_name}"))
        restored.load_state_dict(loaded)
        for name in PARAM_NAMES:
            if not torch.equal(getattr(restored, name).full_tensor(), saved[name]):
                failures.append(f"{module_name}.{name}: differs after loading a {saved_world_size}-way checkpoint "
                                f"into a {ep_mesh.size()}-way EP mesh")
    return failures


def check_bad_meshes(mesh, world_size: int) -> dict:
    """The messages apply_ep raises for a non-divisible expert count and for a second application."""
    import moe_modules

    messages = {}
    for module_name in MODULES:
        module = new_module(module_name, config("swiglu", False, num_experts=world_size + 1))
        try:
            moe_modules.apply_ep(module, mesh, **ep_options(module_name))
            messages[module_name + "-indivisible"] = None
        except ValueError as error:
            messages[module_name + "-indivisible"] = str(error)
        module = new_module(module_name, config("swiglu", False))
        moe_modules.apply_ep(module, mesh, **ep_options(module_name))
        try:
            moe_modules.apply_ep(module, mesh, **ep_options(module_name))
            messages[module_name + "-twice"] = None
        except ValueError as error:
            messages[module_name + "-twice"] = str(error)
    # The peer-memory dispatch: more tokens than max_tokens_per_rank.
    module = build_module("GroupedExpertsDeepEP@peer", config("swiglu", False), make_inputs(
        Case("GroupedExpertsDeepEP", "swiglu", False, "uneven"), world_size), mesh)
    T = PEER_CAPACITY + 1
    try:
        module(torch.randn(T, DIM), torch.ones(T, dtype=torch.bool), torch.rand(T, TOP_K),
               torch.zeros(T, TOP_K, dtype=torch.int64))
        messages["peer-over-capacity"] = None
    except ValueError as error:
        messages["peer-over-capacity"] = str(error)
    # Options that name no transport, or two: refused before anything is sharded.
    for name, options in {"unknown-transport": {"transport": "nccl"},
                          "capacity-without-peer": {"transport": "all_gather", "max_tokens_per_rank": PEER_CAPACITY},
                          "deep-ep-over-all-gather": {"transport": "all_gather", "use_deep_ep": True}}.items():
        module = new_module("GroupedExperts", config("swiglu", False))
        try:
            moe_modules.apply_ep(module, mesh, **options)
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
        messages[name + "-left-unsharded"] = type(module.token_dispatcher).__name__
    return messages


def opcheck_peer_ops(mesh, rank: int, world_size: int) -> dict:
    """``torch.library.opcheck`` of the peer dispatch's own ops on this group (every rank runs the same
    checks, so their collectives line up).  Returns ``{op: {test: outcome}}``."""
    from moe_modules.ep import PeerDispatcher

    case = Case("GroupedExpertsDeepEP", "swiglu", False, "uneven")
    inputs, mine = make_inputs(case, world_size), rank_slice(case, world_size, rank)
    dispatcher = PeerDispatcher(mesh, NUM_EXPERTS, PEER_CAPACITY)
    layout = dispatcher.layout(inputs["token_mask"][mine], inputs["indices"][mine])
    group = dispatcher.group_name
    T, N = layout.pos.shape[0], world_size * PEER_CAPACITY
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    samples = {
        "dispatch": (torch.ops.moe.peer_dispatch.default,
                 (inputs["x"][mine].clone().requires_grad_(), torch.randn(T, 2, requires_grad=True), *layout, group)),
        "combine": (torch.ops.moe.peer_combine.default,
                     (torch.randn(N, DIM, requires_grad=True), torch.randn(N, 2, requires_grad=True), *layout, group,
                      None)),
    }
    with torch.enable_grad():
        return {name: {k: str(v) for k, v in torch.library.opcheck(op, args, test_utils=tests,
                                                                    raise_exception=False).items()}
                for name, (op, args) in samples.items()}


# The all-to-all forward in moe ops, eager: dispatch (route the pairs to ranks, gather the rows sent),
# the block on what arrived (one route of the local pairs, the two fused ops on exactly the valid
# pairs), combine (sum each token's partials from home ranks).  GroupedExpertsTE's block routes,
# gathers, runs TE's GEMMs (one opaque call) and combines on the sorted rows.
A2A_OPS = ["route", "gather", "route", "expert_up", "expert_down", "combine"]
A2A_OPS_TE = ["route", "gather", "route", "gather", "opaque_forward", "combine", "combine"]


def moe_ops_of_forward(module_name: str, mesh, world_size: int) -> dict:
    """The ``moe::`` ops one eager forward calls (in order), and the Python calls it makes (for the record)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "moe":
                self.ops.append(func._opname)
            return func(*args, **(kwargs or {}))

    case = Case(module_name, "swiglu", True, "uneven")
    inputs = make_inputs(case, world_size)
    module = build_module(module_name, config("swiglu", True), inputs, mesh)
    mine = rank_slice(case, world_size, 0)
    args = (inputs["x"][mine], inputs["token_mask"][mine], inputs["weights"][mine], inputs["indices"][mine])
    module(*args)  # warm: the registry's choices are cached
    with Log() as log:
        module(*args)
    calls = []  # the Python functions called, all and in our two packages

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code.co_filename)

    sys.setprofile(profile)
    try:
        module(*args)
    finally:
        sys.setprofile(None)
    ours = [f for f in calls if f"{os.sep}moe_ops{os.sep}" in f or f"{os.sep}moe_modules{os.sep}" in f]
    return {"ops": log.ops, "python_calls": len(calls), "python_files": len(set(calls)),
            "our_python_calls": len(ours), "our_python_files": len(set(ours))}


def worker(rank: int, world_size: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    import moe_modules

    import te_stand_in

    join_gloo(rank, world_size, directory)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    results = {"cases": {}, "dispatchers": {}}
    with te_stand_in.stand_in_engine():
        for case in cases(world_size):
            results["cases"][case.name], results["dispatchers"][case.name] = run_case(case, mesh, rank, world_size)
        results["a2a_forward"] = {m: moe_ops_of_forward(m, mesh, world_size)
                                  for m in ("GroupedExpertsDeepEP", "GroupedExperts@all_to_all", "GroupedExpertsTE")}
    results["state_dict_failures"] = check_state_dict_round_trip(mesh, rank, world_size, directory)
    results["bad_mesh_messages"] = check_bad_meshes(mesh, world_size)
    results["peer_opcheck"] = opcheck_peer_ops(mesh, rank, world_size)
    if world_size == 4:
        # Data parallel x expert parallel: each "dp" replica is an EP group of 2 on mesh["ep"].
        mesh_2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
        try:
            moe_modules.apply_ep(moe_modules.GroupedExperts(config("swiglu", False)), mesh_2d)
            results["mesh_2d_message"] = None
        except ValueError as error:
            results["mesh_2d_message"] = str(error)
        ep_mesh = mesh_2d["ep"]
        ep_rank = ep_mesh.get_local_rank()
        results["submesh_ep_rank"] = ep_rank
        results["submesh_cases"] = {case.name: run_case(case, ep_mesh, ep_rank, 2)[0] for case in submesh_cases()}
        results["reshard_failures"] = check_reshard_load(ep_mesh, world_size, directory)
    save_and_exit(results, rank, directory)


# ---- what every worker script shares (this one, ep_deep_ep_cases.py, test_deep_ep_stand_in.py) ----


def join_gloo(rank: int, world_size: int, directory: str, timeout_s: float = GLOO_TIMEOUT_S) -> None:
    """One thread, and the gloo group of ``world_size`` ranks (file rendezvous in ``directory``, so no
    port can clash; collectives time out after ``timeout_s``)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(directory, "rendezvous"), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def save_and_exit(results, rank: int, directory: str) -> None:
    """Save this rank's results to ``directory/rank{rank}.pt``, tear the group down, and leave."""
    import torch.distributed as dist

    torch.save(results, os.path.join(directory, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Leave without interpreter finalisation: on gloo a rank sometimes aborts there ("terminate called
    # without an active exception") after a clean teardown; the results are saved by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(worker_fn=None) -> None:
    """``python SCRIPT --rank R --world-size W --dir DIR``: run ``worker_fn`` (default: this file's)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    try:
        (worker_fn or worker)(args.rank, args.world_size, args.dir)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not wait on peers: the launcher sees the failure at once


if __name__ == "__main__":
    main()
