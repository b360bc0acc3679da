import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cake.topology import (
    Node,
    Run,
    Topology,
    TopologyError,
    load_topology,
    parse_address,
    parse_topology,
)

REPO = Path(__file__).resolve().parent.parent

TWO_NODES = """
a:
  host: '10.0.0.1:10128'
  description: 'first'
  layers: ['model.layers.0-3', 'model.layers.10-11']
b:
  host: '10.0.0.2:10129'
  layers: ['model.layers.4', 'model.layers.5-5', 'model.layers.6-7']
"""

# (yaml text, {name: (host, port, description, blocks)})
VALID = [
    pytest.param(
        TWO_NODES,
        {
            "a": ("10.0.0.1", 10128, "first", (0, 1, 2, 3, 10, 11)),
            "b": ("10.0.0.2", 10129, "", (4, 5, 6, 7)),
        },
        id="two-nodes",
    ),
    pytest.param(
        "w:\n  host: '[::1]:1'\n  layers: ['model.layers.3']\n",
        {"w": ("::1", 1, "", (3,))},
        id="ipv6-bracketed",
    ),
    pytest.param(
        "w:\n  host: h:65535\n  description:\n  layers: ['model.layers.5', 'model.layers.0-1']\n",
        {"w": ("h", 65535, "", (0, 1, 5))},
        id="unquoted-host-null-description-unsorted-entries",
    ),
    pytest.param(
        "w: {host: 'h:1', layers: ['model.layers.007']}",
        {"w": ("h", 1, "", (7,))},
        id="flow-style-leading-zeros",
    ),
    pytest.param(
        "base: &base {host: 'h:1', layers: ['model.layers.0']}\n"
        "w:\n  <<: *base\n  host: 'h:2'\n  layers: ['model.layers.1']\n",
        {"base": ("h", 1, "", (0,)), "w": ("h", 2, "", (1,))},
        id="merge-key-override-is-not-a-duplicate",
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid(text: str, expected: dict[str, tuple[str, int, str, tuple[int, ...]]]) -> None:
    topology = parse_topology(text)
    got = {n.name: (n.host, n.port, n.description, n.blocks) for n in topology.nodes}
    assert got == expected
    assert list(got) == list(expected)  # file order is kept


def node_yaml(**settings: str) -> str:
    """One node 'w' with the given raw YAML values (defaults are valid)."""
    settings = {"host": "'h:1'", "layers": "['model.layers.0']", **settings}
    return "w:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items() if v != "OMIT")


# (yaml text, fragments that must all appear in the message)
INVALID = [
    pytest.param("a: [1, 2\n", ["line 2", "YAML syntax error"], id="yaml-syntax"),
    pytest.param("a: b\n---\nc: d\n", ["YAML syntax error"], id="two-documents"),
    pytest.param("", ["empty"], id="empty-file"),
    pytest.param("# only a comment\n", ["empty"], id="only-comments"),
    pytest.param("{}", ["empty"], id="empty-mapping"),
    pytest.param("- a\n- b\n", ["top level must be a mapping", "list"], id="top-level-list"),
    pytest.param("just text", ["top level must be a mapping", "str"], id="top-level-scalar"),
    pytest.param(
        node_yaml() + "x:\n  host: 'h:2'\n  layers: ['model.layers.1']\n" + node_yaml()[:-1],
        ["line 7", "duplicate node name 'w'", "first defined on line 1", "unique name"],
        id="duplicate-node",
    ),
    pytest.param(
        "w:\n  host: 'h:1'\n  host: 'h:2'\n  layers: ['model.layers.0']\n",
        ["node 'w'", "line 3", "duplicate key 'host'", "first given on line 2"],
        id="duplicate-key-in-node",
    ),
    pytest.param("{w: 1, w: 2}", ["duplicate node name 'w'"], id="duplicate-on-one-line"),
    pytest.param("7:\n  host: 'h:1'\n", ["node name 7", "quote it"], id="non-string-name"),
    pytest.param("w: 'h:1'\n", ["node 'w'", "must be a mapping", "indent"], id="node-not-mapping"),
    pytest.param("w:\n", ["node 'w'", "must be a mapping", "NoneType"], id="node-null"),
    pytest.param(node_yaml(host="OMIT"), ["node 'w'", "missing 'host'"], id="host-missing"),
    pytest.param(node_yaml(host="10128"), ["node 'w'", "'host' must be a string"], id="host-int"),
    pytest.param(node_yaml(host="'h'"), ["node 'w'", "missing ':port'"], id="host-no-port"),
    pytest.param(node_yaml(host="'h:0'"), ["node 'w'", "1 to 65535"], id="port-zero"),
    pytest.param(node_yaml(host="'h:65536'"), ["1 to 65535"], id="port-too-big"),
    pytest.param(node_yaml(host="'h:http'"), ["1 to 65535"], id="port-not-number"),
    pytest.param(node_yaml(host="':1'"), ["host is empty"], id="host-empty"),
    pytest.param(node_yaml(host="'::1:1'"), ["IPv6 host needs brackets"], id="ipv6-unbracketed"),
    pytest.param(
        node_yaml(description="12"), ["node 'w'", "'description' must be text"], id="desc-int"
    ),
    pytest.param(node_yaml(layers="OMIT"), ["node 'w'", "missing 'layers'"], id="layers-missing"),
    pytest.param(node_yaml(layers="[]"), ["node 'w'", "'layers' is empty"], id="layers-empty"),
    pytest.param(node_yaml(layers=""), ["'layers' is empty"], id="layers-null"),
    pytest.param(
        node_yaml(layers="'model.layers.0-5'"),
        ["node 'w'", "'layers' must be a list", "['model.layers.0-5']"],
        id="layers-not-list",
    ),
    *[
        pytest.param(
            node_yaml(layers=f"[{entry}]"),
            ["node 'w'", "bad layers entry", "'model.layers.A-B'"],
            id=f"bad-entry-{entry}",
        )
        for entry in [
            "'layers.3'",
            "'model.layers.a'",
            "'model.layers.3-'",
            "'model.layers.-1'",
            "'model.layers.1-2-3'",
            "'model.layers.3 '",
            "'model.norm'",
            "3",
            "[1]",
        ]
    ],
    pytest.param(
        node_yaml(layers="['model.layers.5-3']"),
        ["node 'w'", "reversed", "'model.layers.3-5'"],
        id="reversed-range",
    ),
    pytest.param(
        node_yaml(layers="['model.layers.0-99999999']"),
        ["node 'w'", "too large"],
        id="huge-range",
    ),
    pytest.param(
        node_yaml(layers="['model.layers.0-5', 'model.layers.3']"),
        ["node 'w'", "block 3 is listed twice", "'model.layers.0-5'", "'model.layers.3'"],
        id="overlap-within-node",
    ),
    pytest.param(
        node_yaml(layers="['model.layers.0-5']")
        + "x:\n  host: 'h:2'\n  layers: ['model.layers.5-6']\n",
        ["node 'x'", "block 5 is also served by node 'w'", "only one node"],
        id="overlap-between-nodes",
    ),
    pytest.param(
        node_yaml(hosts="'h:2'"),
        ["node 'w'", "unknown key(s) 'hosts'", "did you mean 'host'", "host, description, layers"],
        id="unknown-key",
    ),
]


@pytest.mark.parametrize(("text", "fragments"), INVALID)
def test_invalid(text: str, fragments: list[str]) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(text, source="topo.yml")
    message = str(info.value)
    assert message.startswith("topo.yml: ")
    for fragment in fragments:
        assert fragment in message


def test_error_is_a_value_error_and_default_source() -> None:
    with pytest.raises(ValueError, match=r"^<string>: "):
        parse_topology("")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:10128", ("127.0.0.1", 10128)),
        ("worker.lan:1", ("worker.lan", 1)),
        ("[::1]:10128", ("::1", 10128)),
        ("[fe80::1%eth0]:65535", ("fe80::1%eth0", 65535)),
        ("0.0.0.0:00080", ("0.0.0.0", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "h", ":1", "h:", "h:0", "h:65536", "h:-1", "h: 1", "[::1]", "[]:1", "::1", "a b:1"]
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(TopologyError, match=r"^cli: node 'w': bad address"):
        parse_address(text, source="cli", node="w")


@pytest.mark.parametrize(
    ("host", "port", "address"),
    [("10.0.0.1", 1, "10.0.0.1:1"), ("::1", 10128, "[::1]:10128"), ("h", 2, "h:2")],
)
def test_node_address(host: str, port: int, address: str) -> None:
    node = Node("n", host, port, "", (0,))
    assert node.address == address
    assert parse_address(node.address) == (host, port)


def test_lookups() -> None:
    topology = parse_topology(TWO_NODES)
    a, b = topology.nodes
    assert topology.node("b") is b
    assert [topology.server_of(i) for i in (0, 3, 4, 7, 8, 10, 12)] == [a, a, b, b, None, a, None]
    with pytest.raises(TopologyError, match=r"no node named 'c'; known nodes: 'a', 'b'"):
        topology.node("c")


def test_runs_merge_adjacent_entries_and_cover_every_block() -> None:
    topology = parse_topology(TWO_NODES)
    a, b = topology.nodes
    assert topology.runs(14) == [
        Run(a, 0, 4),
        Run(b, 4, 8),  # three separate entries, one run
        Run(None, 8, 10),
        Run(a, 10, 12),
        Run(None, 12, 14),
    ]
    assert topology.runs(14)[1].blocks == range(4, 8)
    assert topology.master_blocks(14) == [8, 9, 12, 13]


def test_runs_all_on_one_node() -> None:
    topology = parse_topology("w: {host: 'h:1', layers: ['model.layers.0-1', 'model.layers.2']}")
    assert topology.runs(3) == [Run(topology.nodes[0], 0, 3)]
    assert topology.master_blocks(3) == []


def test_check_fits() -> None:
    topology = parse_topology(TWO_NODES, source="t.yml")
    topology.check_fits(12)
    for call in (topology.check_fits, topology.runs, topology.master_blocks):
        with pytest.raises(TopologyError, match=r"^t.yml: node 'a': block 11 .* 11 layers"):
            call(11)


def test_to_yaml_round_trip() -> None:
    topology = parse_topology(TWO_NODES)
    text = topology.to_yaml()
    assert "'model.layers.4-7'" in text or "model.layers.4-7\n" in text  # entries compacted
    assert parse_topology(text) == topology
    only_b = parse_topology(topology.to_yaml(["b"]))
    assert only_b.nodes == (topology.node("b"),)
    assert parse_topology(topology.to_yaml("b")) == only_b  # a lone name is one name
    with pytest.raises(TopologyError, match="no node named 'zz'"):
        topology.to_yaml(["zz"])


def test_to_yaml_ipv6_and_awkward_strings() -> None:
    node = Node("10", "::1", 5, "a: b # c", (0, 2, 3))
    topology = Topology(nodes=(node,), source="<string>")
    assert parse_topology(topology.to_yaml()) == topology


@given(
    owners=st.lists(st.sampled_from([None, "a", "b", "c"]), min_size=1, max_size=40),
)
def test_runs_and_round_trip_property(owners: list[str | None]) -> None:
    """Any assignment of blocks to nodes: runs tile 0..n-1, each run is served by its node."""
    names = [name for name in dict.fromkeys(owners) if name is not None]
    nodes = tuple(
        Node(name, "h", 1 + i, "", tuple(b for b, o in enumerate(owners) if o == name))
        for i, name in enumerate(names)
    )
    topology = Topology(nodes=nodes, source="<string>")
    runs = topology.runs(len(owners))
    assert [b for run in runs for b in run.blocks] == list(range(len(owners)))
    for run, following in itertools.pairwise(runs):
        assert run.node != following.node  # maximal: neighbours never share a server
    for run in runs:
        assert all(topology.server_of(b) == run.node for b in run.blocks)
    if nodes:
        assert parse_topology(topology.to_yaml()) == topology


def test_load_topology(tmp_path: Path) -> None:
    path = tmp_path / "topology.yml"
    path.write_text(TWO_NODES)
    topology = load_topology(path)
    assert topology.source == str(path)
    assert topology == parse_topology(TWO_NODES, source=str(path))

    path.write_text(node_yaml(layers="['model.layers.x']"))
    where = re.escape(str(path))
    with pytest.raises(TopologyError, match=rf"^{where}: node 'w': bad layers entry"):
        load_topology(str(path))


@pytest.mark.parametrize("make_bad", ["missing", "directory", "not-utf8"])
def test_load_topology_unreadable(tmp_path: Path, make_bad: str) -> None:
    path = tmp_path / "topology.yml"
    if make_bad == "directory":
        path.mkdir()
    elif make_bad == "not-utf8":
        path.write_bytes(b"\xff\xfe\x00")
    where = re.escape(str(path))
    with pytest.raises(TopologyError, match=rf"^{where}: (.*--topology|cannot read)"):
        load_topology(path)


def test_example_file_is_valid() -> None:
    topology = load_topology(REPO / "topology.example.yml")
    assert [n.name for n in topology.nodes] == ["linux_server_1", "iphone"]
    topology.check_fits(32)  # written for Meta-Llama-3-8B
    assert topology.master_blocks(32) == [*range(6, 17), *range(18, 32)]


def test_does_not_import_torch() -> None:
    code = "import sys, cake.topology; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
