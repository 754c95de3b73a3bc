"""What a new user reaches from ``import imaml_ext`` alone (issue 19's API surface)."""

import subprocess
import sys


def test_submodules_and_snippet_names_are_reachable_from_the_package():
    """imaml_ext.data was not an attribute after ``import imaml_ext``; BatchedModule,
    task_cross_entropy and Conv4, used in the README's snippets, were not exported."""
    code = ("import imaml_ext\n"
            "assert callable(imaml_ext.data.omniglot_tasks) and callable(imaml_ext.data.load_omniglot)\n"
            "assert imaml_ext.models.Conv4 is imaml_ext.Conv4\n"
            "from imaml_ext.batched import BatchedModule, task_cross_entropy\n"
            "assert imaml_ext.BatchedModule is BatchedModule and imaml_ext.task_cross_entropy is task_cross_entropy\n"
            "assert {'data', 'models', 'Conv4', 'BatchedModule', 'task_cross_entropy'} <= set(imaml_ext.__all__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
