"""The reading order README.md promises: each file imports only the files above it in its table (lazy imports inside
functions included), so there is no cycle, and a method file can be copied with the shared files above it alone."""

import ast
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith('.py'))


def readme_order():
    """The .py files named in the first column of README.md's file table, top to bottom."""
    order = []
    for line in open(os.path.join(ROOT, 'README.md')):
        first = re.fullmatch(r'\s*`(\w+)\.py`\s*', line.split('|')[1]) if line.startswith('| `') else None
        if first:                        # a row of the file table: its first cell is one file name
            order.append(first.group(1))
    return order


def project_imports(module):
    """Every project module that `module` imports, at the top or inside a function."""
    tree = ast.parse(open(os.path.join(ROOT, module + '.py')).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split('.')[0])
    return found & set(MODULES)


def test_readme_table_lists_every_file_once():
    order = readme_order()
    assert sorted(order) == MODULES, f"README's table lists {order}; the files are {MODULES}"


def test_every_import_points_up_the_table():
    order = readme_order()
    upward = [f"{m} imports {d}" for i, m in enumerate(order) for d in sorted(project_imports(m))
              if d not in order[:i]]
    assert not upward, "imports that point down README's table (or form a cycle): " + "; ".join(upward)


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above can fail: a copy of the tree where processes.py imports sample is refused."""
    for name in MODULES:
        text = open(os.path.join(ROOT, name + '.py')).read()
        (tmp_path / (name + '.py')).write_text(('import sample\n' if name == 'processes' else '') + text)
    (tmp_path / 'README.md').write_text(open(os.path.join(ROOT, 'README.md')).read())
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', str(tmp_path))
    order = readme_order()
    assert 'sample' in project_imports('processes')
    assert 'sample' not in order[:order.index('processes')]


def test_a_method_file_runs_with_the_shared_files_alone(tmp_path):
    """Copy each distiller with the shared files above the method files and nothing else: it imports, and importing
    it (or any file) runs no command line."""
    order = readme_order()
    first_method = min(i for i, m in enumerate(order) if m.startswith('distill_'))
    shared = order[:first_method]
    for method in (m for m in order if m.startswith('distill_')):
        folder = tmp_path / method
        folder.mkdir()
        for name in shared + [method]:
            (folder / (name + '.py')).write_text(open(os.path.join(ROOT, name + '.py')).read())
        run = subprocess.run([sys.executable, '-c', f'import {method}; print("ok")'], cwd=folder,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and run.stdout == 'ok\n', run.stderr[-2000:]
