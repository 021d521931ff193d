"""The torch checkpoint reader against crafted files: every attack is refused with one short
printable line, nothing run, memory bounded by the file, and the launcher exits 2 with that
line. Files are built opcode by opcode (tests/torch_craft.py); torch is not needed."""

import collections
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch_craft as tc
from cli_helpers import ROOT, run_module, subprocess_env

from sigma_jax.convert import CheckpointError, read_official
from sigma_jax.torch_errors import MAX_MESSAGE

FIXTURE = ROOT / "tests" / "fixtures" / "official" / "vocab7.pt"


def _assert_clean(error: Exception) -> str:
    message = str(error)
    assert message and len(message) <= MAX_MESSAGE, len(message)
    assert message.isprintable(), repr(message)  # no escape, no newline, no other control
    return message


def _tiny_with(**changes):
    """(model_args, tensors, storages) of the tiny model with some tensors or args replaced."""
    args, tensors, storages, _ = tc.tiny_model()
    args.update(changes.pop("args", {}))
    tensors.update(changes.pop("tensors", {}))
    storages.update(changes.pop("storages", {}))
    assert not changes
    return args, tensors, storages


def _write(path, args, tensors, storages, **kwargs):
    tc.write_archive(path, tc.pickle_of(tc.official(args, tensors, **kwargs)), storages)


def _nested_tuple(depth: int) -> tc.Raw:
    return tc.Raw(b"N" + b"\x85" * depth)  # (((None,),),...)


def _nested_list(depth: int) -> tc.Raw:
    return tc.Raw(b"]" * depth + b"a" * (depth - 1))


def _zero_stride(path):  # a 6 KB file asking 3 GiB
    _write(path, *_tiny_with(tensors={
        "transformer.wpe.weight": tc.Tensor("1", 4, (2, 2), (0, 1)),
        "transformer.h.0.mlp.c_fc.weight": tc.Tensor("6", 64, (1 << 28, 3), (0, 1))}))


def _overlapping_strides(path):
    _write(path, *_tiny_with(tensors={
        "transformer.h.0.attn.c_attn.weight": tc.Tensor("3", 48, (12, 4), (3, 1))}))


def _past_the_end(path):  # 32 GiB asked of a 48-element storage
    _write(path, *_tiny_with(tensors={
        "transformer.h.0.attn.c_attn.weight": tc.Tensor("3", 48, (1 << 16, 1 << 17), (1 << 17, 1))
    }))


def _huge_block_size(path):  # block_size 5e7 over a 4-element storage, zero and unit strides
    _write(path, *_tiny_with(args={"block_size": 50_000_000}, tensors={
        "transformer.wpe.weight": tc.Tensor("1", 4, (50_000_000, 2), (2, 1))}))


def _huge_block_size_zero_stride(path):
    _write(path, *_tiny_with(args={"block_size": 50_000_000}, tensors={
        "transformer.wpe.weight": tc.Tensor("1", 4, (50_000_000, 2), (0, 1))}))


def _lying_numel(path):  # the pid says 10^12 floats; the entry holds 4
    _write(path, *_tiny_with(tensors={
        "transformer.wpe.weight": tc.Tensor("1", 10**12, (500_000, 2_000_000), (2_000_000, 1))}))


def _many_layers_few_entries(path):
    _write(path, *_tiny_with(args={"n_layer": 1 << 30}))


def _shared_storage(path):  # every weight of 200 layers a view of the same storages
    args, tensors, storages = _tiny_with(args={"n_layer": 200})
    for name in list(tensors):
        if ".h.0." in name:
            for i in range(1, 200):
                tensors[name.replace(".h.0.", f".h.{i}.")] = tensors[name]
    _write(path, args, tensors, storages)


def _compressed(path):  # deflated storages: 1.5 MB of zeros would inflate to GBs
    args, tensors, storages = _tiny_with()
    tc.write_archive(path, tc.pickle_of(tc.official(args, tensors)), storages,
                     compression=zipfile.ZIP_DEFLATED)


def _zip_field(path, kind: str, field_offset: int, fmt: str, value: int, entry: int = 0):
    _write(path, *_tiny_with())
    data = path.read_bytes()
    at = tc.records(data)[kind][entry]
    path.write_bytes(tc.patch(data, at + field_offset, fmt, value))


def _encrypted(path):  # the encryption bit, in the central directory
    _zip_field(path, "central", 8, "H", 0x0001)


def _encrypted_local(path):  # ... and only in a local header
    _zip_field(path, "local", 6, "H", 0x0801)


def _lzma(path):  # method 14 (LZMA) on a stored entry
    _zip_field(path, "central", 10, "H", 14)


def _unsupported_method(path):
    _zip_field(path, "central", 10, "H", 99)


def _overlapping_entries(path):  # storage 1's record points at storage 0's bytes
    _write(path, *_tiny_with())
    data = path.read_bytes()
    central = tc.records(data)["central"]
    offset_of_second = tc.CENTRAL.unpack_from(data, central[2])[-1]
    path.write_bytes(tc.patch(data, central[3] + 42, "I", offset_of_second))


def _huge_central_directory(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("ckpt/data.pkl", tc.pickle_of({}))
        for i in range(24_000):
            z.writestr(f"ckpt/x{i}", b"")


def _deep_persistent_id(path):
    pid = tc.Raw(_nested_tuple(200_000).data + b"Q")
    _write(path, *_tiny_with(tensors={"transformer.wte.weight": pid}))


def _deep_config_key(path):
    config = tc.Raw(b"}" + _nested_tuple(200_000).data + b"K\x01s")
    _write(path, *_tiny_with(), config=config)


def _deep_config_value(path):
    _write(path, *_tiny_with(), config={"dataset": _nested_list(100_000)})


def _deep_iter_num(path):
    _write(path, *_tiny_with(), iter_num=_nested_list(100_000))


def _cycle(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"]q\x00h\x00a"))  # a list inside itself


def _binbytes8_huge(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"\x8e" + (1 << 62).to_bytes(8, "little")))


def _binunicode8_huge(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"\x8d" + (1 << 64 - 1).to_bytes(8, "little")))


def _shared_list_blowup(path):  # 50^6 leaves if walked: a 300-million-character repr
    body = b"]q\x00(" + b"K\x00" * 50 + b"e0"
    for level in range(1, 6):
        body += b"]q" + bytes([level]) + b"(" + (b"h" + bytes([level - 1])) * 50 + b"e0"
    _write(path, *_tiny_with(), iter_num=tc.Raw(body + b"h\x05"))


def _build_on_function(path):  # BUILD setting attributes on the reader's own function
    build = tc.global_("torch._utils", "_rebuild_tensor_v2") + b"}" + tc.unicode("x") + \
        b"K\x01sb0N"
    _write(path, *_tiny_with(), iter_num=tc.Raw(build))


def _build_non_dict_state(path):
    build = tc.encode(collections.OrderedDict()) + b"(K\x01K\x02tb"
    _write(path, *_tiny_with(), config=tc.Raw(build))


def _build_shadowing_method(path):  # OrderedDict state through a non-dict: a (dict, slots) pair
    build = tc.encode(collections.OrderedDict()) + b"N}" + tc.unicode("items") + b"K\x01s\x86b"
    _write(path, *_tiny_with(), config=tc.Raw(build))


def _escape_in_name(path):
    args, tensors, storages = _tiny_with()
    tensors[f"transformer.{tc.ESC}.weight"] = tensors["transformer.ln_f.weight"]
    _write(path, args, tensors, storages)


def _escape_in_global(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(tc.global_("torch", f"Float{tc.ESC}")))


def _escape_in_model_args(path):
    _write(path, *_tiny_with(args={f"n_{tc.ESC}": 1}))


def _huge_iter_num(path):
    _write(path, *_tiny_with(), iter_num=1 << 62)


def _bool_iter_num(path):
    _write(path, *_tiny_with(), iter_num=True)


def _int_of_70_bits(path):
    _write(path, *_tiny_with(), iter_num=1 << 70)


def _too_many_opcodes(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"(" + b"N" * 500_000 + b"t"))


def _tuple_key(path):
    _write(path, *_tiny_with(), config=tc.Raw(b"}(K\x01tK\x02s"))


def _reduce_storage_type(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(tc.global_("torch", "FloatStorage") + b")R"))


def _ordered_dict_from_arguments(path):
    call = tc.global_("collections", "OrderedDict") + b"(" + tc.encode([("a", 1)]) + b"tR"
    _write(path, *_tiny_with(), config=tc.Raw(call))


def _storage_two_dtypes(path):
    _write(path, *_tiny_with(tensors={
        "transformer.wpe.weight": tc.Tensor("0", 6, (2, 2), (2, 1), storage="DoubleStorage")}))


def _append_to_dict(path):
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"}K\x01a"))


def _after_stop(path):
    data = tc.pickle_of(tc.official(*_tiny_with()[:2])) + b"garbage"
    tc.write_archive(path, data, _tiny_with()[2])


def _instance_opcode(path):  # INST: a class call the machine refuses
    _write(path, *_tiny_with(), iter_num=tc.Raw(b"(ios\nsystem\n"))


CASES = {
    "zero stride": (_zero_stride, "overlap"),
    "overlapping strides": (_overlapping_strides, "overlap"),
    "view past the end": (_past_the_end, "past the end"),
    "block_size 5e7 over a tiny storage": (_huge_block_size, "past the end"),
    "block_size 5e7, zero stride": (_huge_block_size_zero_stride, "overlap"),
    "numel larger than the entry": (_lying_numel, "holds 16 bytes"),
    "n_layer 2^30": (_many_layers_few_entries, "n_layer"),
    "200 layers sharing one layer's storages": (_shared_storage, "share storage"),
    "compressed entries": (_compressed, "compressed"),
    "encrypted flag": (_encrypted, "encrypted"),
    "encrypted flag in a local header": (_encrypted_local, "encrypted"),
    "LZMA method": (_lzma, "method 14"),
    "unsupported method": (_unsupported_method, "method 99"),
    "overlapping zip entries": (_overlapping_entries, "overlap"),
    "huge central directory": (_huge_central_directory, "zip structure"),
    "deep persistent id": (_deep_persistent_id, "persistent id"),
    "deep config key": (_deep_config_key, "dict key of type tuple"),
    "deep config value": (_deep_config_value, "deep"),
    "deep iter_num": (_deep_iter_num, "deep"),
    "a list inside itself": (_cycle, "cycle"),
    "BINBYTES8 of 2^62": (_binbytes8_huge, "damaged pickle"),
    "BINUNICODE8 of 2^63": (_binunicode8_huge, "damaged pickle"),
    "shared list blowup": (_shared_list_blowup, "values"),
    "BUILD on a function": (_build_on_function, "BUILD"),
    "BUILD with a tuple state": (_build_non_dict_state, "BUILD"),
    "BUILD with a slots-pair state": (_build_shadowing_method, "BUILD"),
    "escape sequences in a name": (_escape_in_name, "no place for"),
    "escape sequences in a global": (_escape_in_global, "refused to load"),
    "escape sequences in model_args": (_escape_in_model_args, "model_args field"),
    "iter_num 2^62": (_huge_iter_num, "iter_num"),
    "iter_num True": (_bool_iter_num, "iter_num"),
    "an int of 71 bits": (_int_of_70_bits, "71 bits"),
    "500,000 opcodes": (_too_many_opcodes, "opcodes"),
    "tuple dict key": (_tuple_key, "dict key"),
    "call of a storage type": (_reduce_storage_type, "call of"),
    "OrderedDict from arguments": (_ordered_dict_from_arguments, "OrderedDict"),
    "one storage, two dtypes": (_storage_two_dtypes, None),
    "APPEND to a dict": (_append_to_dict, "APPEND"),
    "data after STOP": (_after_stop, "after STOP"),
    "INST opcode": (_instance_opcode, "INST"),
}


@pytest.fixture(scope="module")
def crafted(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("crafted")
    paths = {}
    for i, (name, (make, _)) in enumerate(CASES.items()):
        paths[name] = folder / f"case{i}.pt"
        make(paths[name])
    return paths


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_file_is_one_short_printable_line(crafted, case):
    _, fragment = CASES[case]
    with pytest.raises(CheckpointError) as caught:
        read_official(crafted[case])
    message = _assert_clean(caught.value)
    if fragment is not None:
        assert fragment in message, message


def test_build_leaves_the_reader_untouched(crafted):
    from sigma_jax import torch_file

    with pytest.raises(CheckpointError):
        read_official(crafted["BUILD on a function"])
    assert not hasattr(torch_file._rebuild_tensor, "x")
    assert read_official(FIXTURE).model_cfg.vocab_size == 7


_MEMORY_CHILD = """
import json, resource, sys
from sigma_jax.convert import read_official
from sigma_jax.torch_errors import CheckpointError
read_official(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcomes = {}
for path in sys.argv[2:]:
    try:
        read_official(path)
        outcomes[path] = "loaded"
    except CheckpointError:
        outcomes[path] = "refused"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"base_kib": base, "peak_kib": peak, "outcomes": outcomes}))
"""


def test_crafted_files_need_no_more_memory_than_a_real_one(crafted):
    # after loading a real checkpoint, all crafted files together raise the peak by < 64 MiB
    paths = [str(p) for p in crafted.values()]
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(FIXTURE), *paths], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert set(report["outcomes"].values()) == {"refused"}
    assert report["peak_kib"] - report["base_kib"] < 64 * 1024, report


@pytest.mark.integration
@pytest.mark.parametrize("case", ["escape sequences in a name", "zero stride"])
def test_a_crafted_file_through_the_launcher_is_exit_2_and_one_line(crafted, tmp_path, case):
    workdir = tmp_path / "run"
    out = run_module("-m", "launch.convert", f"--official={crafted[case]}",
                     f"--workdir={workdir}")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert lines[0].isprintable() and len(lines[0]) < MAX_MESSAGE + 20
    assert not workdir.exists() and list(tmp_path.iterdir()) == []
