"""Multi-host start-up and the mesh flags shared by the launchers (train, sample).

Flags (defined by `define_flags`):
  --mesh=data:fsdp:tensor   e.g. 8:1:1 or 2:2:2; 'auto' (default) = every device on "data"
                            (one device on a single-process CPU host; see sharding.mesh_config)
  --mesh_axis_type=auto|explicit
  --host_devices=N          (launch.sample) N CPU devices in this process (default 1): on a
                            CPU host, N > 1 samples a batch's rows on the cores side by side
                            (--mesh=auto then puts the N devices on "data"; one loop per device)
  --distributed=auto|on|off and --coordinator_address, --num_processes, --process_id

Start-up order in a launcher's main (every process runs the same program):
  initialize()   the host devices, then jax.distributed.initialize() when asked or when a
                 cluster is detected: before any other JAX call;
  build_mesh()   the mesh from --mesh / --mesh_axis_type, checked against the devices;
  then `with jax.set_mesh(mesh)` (sigma_jax.train.train does it) and log on process 0 only.

--distributed=auto initialises when one of these is found, and never on a plain single host:
  explicit flags        --coordinator_address, --num_processes or --process_id (or the
                        JAX_COORDINATOR_ADDRESS environment variable);
  SLURM                 an srun step with more than one task (SLURM_NTASKS > 1 and the other
                        variables JAX's SLURM support reads);
  Open MPI              mpirun with more than one rank;
  Cloud TPU             TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES listing several hosts
                        (GKE), or a Cloud TPU VM (libtpu installed and a TPU device node
                        present); JAX then reads the pod layout from the metadata server.
--distributed=on always initialises (with whatever the flags and the environment give);
--distributed=off never does.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from absl import flags

from sigma_jax import sharding as sh

FLAGS = flags.FLAGS
DISTRIBUTED_MODES = ("auto", "on", "off")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define the mesh and multi-host flags (a no-op if they exist)."""
    if "mesh" in flag_values:
        return
    flags.DEFINE_string("mesh", "auto", "Device mesh data:fsdp:tensor, e.g. 8:1:1 or 2:2:2; "
                        "'auto' puts every device on data (one device on a single CPU host).",
                        flag_values=flag_values)
    define_axis_type_flag(flag_values)
    flags.DEFINE_string("distributed", "auto", "jax.distributed.initialize(): auto (when a "
                        "cluster is detected: SLURM, Open MPI, Cloud TPU, or the flags below), "
                        "on, or off.", flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).",
                         flag_values=flag_values)


def define_host_devices_flag(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define --host_devices (CPU devices of this process), read by `initialize`.

    Sampling only: the train step already keeps both cores of a CPU host busy on one device
    (its gradient lanes), and runs slower on two."""
    flags.DEFINE_integer("host_devices", 1, "CPU devices of this process (jax_num_cpu_devices). "
                         "On a CPU host, N > 1 samples a batch's rows on the cores side by side; "
                         "--mesh=auto then puts the N devices on data.", flag_values=flag_values)


def use_host_devices(count: int) -> None:
    """Ask for `count` CPU devices in this process (`jax_num_cpu_devices`; before any other JAX
    call). Raises a one-line ValueError unless count >= 1."""
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"--host_devices must be >= 1; got {count}")
    if count > 1:
        import jax

        jax.config.update("jax_num_cpu_devices", count)


def define_axis_type_flag(flag_values: flags.FlagValues = FLAGS) -> None:
    """Define --mesh_axis_type (auto or explicit)."""
    flags.DEFINE_string("mesh_axis_type", "auto", "Mesh axis type: auto (XLA propagates "
                        "shardings) or explicit (shardings in the array types).",
                        flag_values=flag_values)


# ---------------------------------------------------------------------------- cluster detection


def _int(environ: Mapping[str, str], name: str, default: int = 1) -> int:
    try:
        return int(environ.get(name, default))
    except ValueError:
        return default


def _cloud_tpu_vm() -> bool:
    """libtpu is installed and a TPU device node exists (v2-v4: /dev/accel*, v5+: /dev/vfio/N).
    Looks at files only: no JAX backend is started."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    if any(Path("/dev").glob("accel[0-9]*")):
        return True
    vfio = Path("/dev/vfio")
    return vfio.is_dir() and any(p.name.isdigit() for p in vfio.iterdir())


def cluster_environment(environ: Mapping[str, str] | None = None,
                        tpu_vm: Callable[[], bool] = _cloud_tpu_vm) -> str | None:
    """The multi-process environment this process runs in ('SLURM', 'Open MPI', 'Cloud TPU',
    'JAX_COORDINATOR_ADDRESS'), or None on a plain single host."""
    environ = os.environ if environ is None else environ
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if all(name in environ for name in slurm) and _int(environ, "SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1 or tpu_vm():
        return "Cloud TPU"
    return None


def distributed_args(mode: str, coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None, environ: Mapping[str, str] | None = None,
                     tpu_vm: Callable[[], bool] = _cloud_tpu_vm) -> dict | None:
    """The keyword arguments of `jax.distributed.initialize` for these flag values, or None to
    stay single-process. Raises a one-line ValueError for bad values."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"--distributed must be auto, on or off; got {mode!r}")
    given = {k: v for k, v in (("coordinator_address", coordinator_address),
                               ("num_processes", num_processes), ("process_id", process_id))
             if v is not None}
    if mode == "off":
        if given:
            raise ValueError(f"--distributed=off conflicts with --{', --'.join(given)}")
        return None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1; got {num_processes}")
    if process_id is not None and not (
            process_id >= 0 and (num_processes is None or process_id < num_processes)):
        raise ValueError(f"--process_id must lie in [0, --num_processes); got {process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
        raise ValueError(f"--coordinator_address must be host:port; got {coordinator_address!r}")
    if mode == "on" or given or cluster_environment(environ, tpu_vm) is not None:
        return given
    return None


def initialize(log: Callable[[str], None] | None = None) -> bool:
    """--host_devices where the launcher defines it, then `jax.distributed.initialize()` as the
    flags say (call it before any other JAX call). Returns whether the latter ran. Raises a
    one-line ValueError for bad flag values."""
    use_host_devices(FLAGS.host_devices if "host_devices" in FLAGS else 1)
    args = distributed_args(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                            FLAGS.process_id)
    if args is None:
        return False
    import jax

    jax.distributed.initialize(**args)
    if log is not None and jax.process_index() == 0:
        log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process)")
    return True


# ---------------------------------------------------------------------------- mesh


def build_mesh():
    """The mesh of --mesh / --mesh_axis_type over all devices of all processes. Raises a
    one-line ValueError for a malformed flag or a mesh that the devices cannot hold."""
    return sh.make_mesh(sh.mesh_config(FLAGS.mesh, FLAGS.mesh_axis_type))


def mesh_text(mesh) -> str:
    """'data:fsdp:tensor (axis type)' of a mesh, for logs."""
    kind = "explicit" if "Explicit" in str(mesh.axis_types[0]) else "auto"
    return f"{sh.mesh_text(mesh)} ({kind})"


def is_primary() -> bool:
    """Process 0: the only one that prints and writes files."""
    import jax

    return jax.process_index() == 0
