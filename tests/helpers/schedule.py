"""How a run with pytest-xdist workers (`-n auto`) hands out the tests (tests/conftest.py installs it).

xdist's default hands out tests in file order, in large first batches: on 2 cores one worker got the
compile tests and the GPU check's dry run together and ran 70 s after the other had finished. Here
the longest tests start first, and tests that share something costly that lives in one process run
in one worker, one after the other:

- a Ray cluster and a local run to compare with (test_ray.py), a module's reference run
  (test_interrupts.py, test_devices.py), a server's engine or process (test_server.py,
  test_server_client.py), a browser and its servers (test_page.py): module fixtures, built once per
  worker that runs the module;
- the decode step compiled in the test process: dynamo keeps what it compiled in the process, so a
  second test that compiles the same step there gets it for nothing (test_confidence's compiled
  Kosmos-2.5 step, then test_generation's), and only the first compile of a process pays for
  inductor's start (about 6 s).

Everything else is one test at a time, in file order, to whichever worker is free. A test missing
from these lists is only scheduled later than it could be; nothing else depends on them.
"""

from __future__ import annotations

from xdist.scheduler import LoadScopeScheduling

# Tests that run in one worker, in the order listed (a prefix of a test id, or a file).
TOGETHER = {
    "compiled in the test process": [
        "tests/test_confidence.py::test_the_compiled_step_gives_the_same_log_probabilities",
        "tests/test_generation.py::test_compiled_engine_keeps_its_cache",  # the step just compiled
        "tests/test_generation.py::test_the_compiled_step_writes_only_static_inputs",  # resets dynamo
        "tests/test_kosmos2.py::test_compiled_decoding_equals_eager",
        "tests/test_gpu.py::test_bf16_compiled_agrees_with_eager",
    ],
    "ray": ["tests/test_ray.py::"],
    "interrupts": ["tests/test_interrupts.py::"],
    "devices": ["tests/test_devices.py::"],
    "server": ["tests/test_server.py::"],  # one engine and its batch thread for the module
    "server client": ["tests/test_server_client.py::"],  # one `kosmos serve` process for the module
    "page": ["tests/test_page.py::"],  # one browser and four `kosmos serve` processes for the module
}

# What starts first, longest first: a test id prefix or a name from TOGETHER, with its seconds in a
# 2-worker run on 2 cores.
FIRST = [
    "compiled in the test process",  # 90
    "tests/test_gpu_check.py::test_the_dry_run_measures_every_step",  # 75
    "tests/test_generation.py::test_one_compile_with_a_cold_and_then_a_warm_cache",  # 3 tests, 28-38 each
    "page",  # 40
    "ray",  # 30
    "devices",  # 22
    "interrupts",  # 15
    "tests/test_benchmark.py::",  # 12-16 (30 if it compiles the step first)
]


class LongestFirst(LoadScopeScheduling):
    """xdist's scheduling by scope, where a scope is a group of TOGETHER or else one test, handed out
    in the order of FIRST and then in file order."""

    def __init__(self, config, log=None):
        super().__init__(config, log)
        self._scopes: dict[str, str] = {}
        self._ordered = False

    def _split_scope(self, nodeid: str) -> str:
        if nodeid not in self._scopes:
            self._scopes[nodeid] = next((name for name, prefixes in TOGETHER.items()
                                         if any(nodeid.startswith(p) for p in prefixes)), nodeid)
        return self._scopes[nodeid]

    def _assign_work_unit(self, node) -> None:
        if not self._ordered:  # the queue is complete by the first assignment
            self._ordered = True
            position = {scope: i for i, scope in enumerate(self.workqueue)}
            rank = lambda scope: next((i for i, p in enumerate(FIRST) if scope == p or scope.startswith(p)), len(FIRST))
            for scope in sorted(self.workqueue, key=lambda scope: (rank(scope), position[scope])):
                self.workqueue.move_to_end(scope)
        scope, unit = self.workqueue.popitem(last=False)
        self.assigned_work.setdefault(node, {})[scope] = unit
        prefixes = TOGETHER.get(scope, [])
        order = lambda nodeid: next((i for i, p in enumerate(prefixes) if nodeid.startswith(p)), len(prefixes))
        collection = self.registered_collections[node]
        node.send_runtest_some([collection.index(nodeid) for nodeid in sorted(unit, key=order) if not unit[nodeid]])
