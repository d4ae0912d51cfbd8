"""Which attention functions pass the fetched history straight to the routed helper.

During decode a routed model's attention normally never reads the history `update_and_fetch`
returns: it hands it to `scaled_dot_product_attention`, which the routing answers in place from the
pools. Building that history (a lazy gather per pool) is then pure host time, the largest part of
a layer's. So a cache hands out the history only to callers that may read it: when the calling
function is *proven* to pass it straight on, it gets two placeholders instead, and the routed helper
builds the real history itself if it cannot answer (see `routing.paged_sdpa`).

The proof reads the caller's source once per code object (`passes_history_through`). The function
must contain, outside any loop:

    <a>, <b> = <cache>.update_and_fetch(...)              # the only update_and_fetch call
    ... scaled_dot_product_attention(<q>, <a>, <b>, <cache>, ...)   # or cache=<cache>; at most one

and after that assignment read `<a>` and `<b>` nowhere but as that call's 2nd and 3rd positional
arguments, never rebind `<a>`, `<b>` or `<cache>` (by any binding form), never name `<a>` or `<b>`
in a nested function, lambda, class or comprehension (which could run at any time), never bind
the helper's name, use no introspection (`locals`, `vars`, `eval`, `exec`, frame access), and not
be a generator (other code could run between the fetch and the call). The
`else` branch of an `if` that holds the assignment never runs after it, so it may use the names.
The source must compile to the running bytecode (a file edited after import is not trusted). At
each call the cache also checks that the caller's module still routes the helper. Anything else
(a function that transforms the keys, returns them, reads them in a loop, calls `mx.fast`
directly) gets the real lazy history, as every caller did before.
"""

from __future__ import annotations

import ast
import dis
import inspect
import textwrap
import threading
from types import CodeType

HELPER = "scaled_dot_product_attention"
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)
_INTROSPECTION = {"locals", "vars", "eval", "exec"}
_FRAME_ACCESS = {"_getframe", "currentframe", "f_locals", "f_back", "stack"}

_SAME_OPERATION = {"LOAD_METHOD": "LOAD_ATTR"}  # 3.11 compiles `a.f(...)` either way
# id(code) -> (code, proven): keyed by id because hashing a code object hashes its bytecode and
# constants at every lookup; the entry holds the code, so its id cannot pass to another object
_PROOFS: dict[int, tuple[CodeType, bool]] = {}
_LOCK = threading.Lock()


def passes_history_through(code: CodeType) -> bool:
    """Whether the function with this code passes `update_and_fetch`'s result only to the routed
    helper (the module docstring's rule). Cached per code object; never raises."""
    entry = _PROOFS.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1]
    try:
        proven = _prove(code)
    except Exception:  # noqa: BLE001 - no source, a syntax mlx-lm never has: not proven
        proven = False
    with _LOCK:
        _PROOFS[id(code)] = (code, proven)
    return proven


def prove_model(model) -> int:
    """Proves, ahead of the first decode step, every method of the model's layer classes that
    calls `update_and_fetch` (reading a source takes ~0.1 s). Returns how many were proven."""
    classes = {type(module) for _, module in model.named_modules()} | {type(model)}
    codes = [
        function.__code__
        for cls in classes
        for function in vars(cls).values()
        if inspect.isfunction(function) and "update_and_fetch" in function.__code__.co_names
    ]
    return sum(passes_history_through(code) for code in codes)


def _prove(code: CodeType) -> bool:
    function = _function_node(code)
    return function is not None and _passes_through(function)


def _function_node(code: CodeType) -> ast.FunctionDef | None:
    """The function's syntax tree, if its source compiles to exactly this bytecode."""
    lines, _ = inspect.getsourcelines(code)
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    compiled = compile(tree, code.co_filename, "exec")
    body = next((c for c in compiled.co_consts if isinstance(c, CodeType)), None)
    same = body is not None and _instructions(body) == _instructions(code)
    return tree.body[0] if same else None


def _instructions(code: CodeType) -> list[tuple]:
    """The bytecode as (operation, operand) pairs, blind to what differs between compilations
    of the same source (method-call forms, jump offsets, padding)."""
    jumps = set(dis.hasjrel) | set(dis.hasjabs)
    return [
        (_SAME_OPERATION.get(i.opname, i.opname), None if i.opcode in jumps else _operand(i.argval))
        for i in dis.get_instructions(code)
        if i.opname not in ("NOP", "EXTENDED_ARG", "CACHE")
    ]


def _operand(value) -> object:
    if isinstance(value, CodeType):  # a nested function or comprehension: its own bytecode
        return (value.co_name, tuple(_instructions(value)))
    return repr(value)


def _passes_through(function: ast.FunctionDef) -> bool:
    nested = [
        n
        for n in ast.walk(function)
        if n is not function and isinstance(n, _SCOPES + _COMPREHENSIONS)
    ]
    inner = {id(n) for scope in nested for n in ast.walk(scope)}  # nodes of nested scopes
    updates = [
        n
        for n in ast.walk(function)
        if isinstance(n, ast.Attribute) and n.attr == "update_and_fetch"
    ]
    if len(updates) != 1 or id(updates[0]) in inner:
        return False
    assign = _fetch_assignment(function, updates[0])
    if assign is None or _inside(function, assign, _LOOPS):
        return False
    (first, second), cache = assign.targets[0].elts, assign.value.func.value.id
    names = {first.id, second.id}
    if first.id == second.id or cache in names or HELPER in _bound_names(function):
        return False
    if any(names & _names_in(scope) for scope in nested):
        return False  # a closure or comprehension may read them whenever it runs
    calls = [
        n
        for n in ast.walk(function)
        if isinstance(n, ast.Call) and _is_helper_call(n, first.id, second.id, cache)
    ]
    if len(calls) > 1 or (calls and _inside(function, calls[0], _LOOPS)):
        return False  # the routed helper answers one call per fetch
    allowed = {id(calls[0].args[1]), id(calls[0].args[2])} if calls else set()
    after = (assign.end_lineno, assign.end_col_offset)
    for node in ast.walk(function):
        if isinstance(node, ast.Name) and node.id in _INTROSPECTION:
            return False
        if isinstance(node, (ast.Yield, ast.YieldFrom, ast.Await)) and id(node) not in inner:
            return False  # other code may run (and fetch again) between the fetch and the call
        if isinstance(node, ast.Attribute) and node.attr in _FRAME_ACCESS:
            return False
        if isinstance(node, (ast.Global, ast.Nonlocal)) and (names | {cache}) & set(node.names):
            return False
        if not hasattr(node, "lineno") or (node.lineno, node.col_offset) < after:
            continue
        if _exclusive(function, assign, node):
            continue  # the other branch of an `if` around the assignment: never runs after it
        if _binds(node) & (names | {cache}):
            return False  # rebound: the helper would get something else, or another cache
        if isinstance(node, ast.AugAssign) and _names_in(node.target) & names:
            return False
        if isinstance(node, ast.Name) and node.id in names and id(node) not in allowed:
            return False
    return True


def _fetch_assignment(function: ast.FunctionDef, attribute: ast.Attribute) -> ast.Assign | None:
    """`<a>, <b> = <cache>.update_and_fetch(...)` holding this attribute, else None."""
    for node in ast.walk(function):
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        value, target = node.value, node.targets[0]
        if not (isinstance(value, ast.Call) and value.func is attribute):
            continue
        if not isinstance(attribute.value, ast.Name):
            return None
        pair = isinstance(target, (ast.Tuple, ast.List)) and len(target.elts) == 2
        if pair and all(isinstance(e, ast.Name) for e in target.elts):
            return node
        return None
    return None


def _is_helper_call(call: ast.Call, first: str, second: str, cache: str) -> bool:
    """`scaled_dot_product_attention(q, <a>, <b>, <cache>, ...)` (or `cache=<cache>`), no
    unpacking."""
    args = call.args
    return (
        isinstance(call.func, ast.Name)
        and call.func.id == HELPER
        and len(args) >= 3
        and not any(isinstance(a, ast.Starred) for a in args)
        and all(k.arg is not None for k in call.keywords)
        and isinstance(args[1], ast.Name)
        and args[1].id == first
        and isinstance(args[2], ast.Name)
        and args[2].id == second
        and any(
            isinstance(given, ast.Name) and given.id == cache
            for given in [*args[3:4], *(k.value for k in call.keywords if k.arg == "cache")]
        )
    )


def _bound_names(function: ast.FunctionDef) -> set[str]:
    """Every name the function or a scope inside it binds (parameters, assignments, imports,
    `def`, `class`, `except ... as`, `match` captures, `del`)."""
    return {name for node in ast.walk(function) if node is not function for name in _binds(node)}


def _binds(node: ast.AST) -> set[str]:
    """The names this one node binds (or unbinds)."""
    if isinstance(node, ast.Name):
        return set() if isinstance(node.ctx, ast.Load) else {node.id}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.ExceptHandler):
        return {node.name} if node.name else set()
    if isinstance(node, ast.alias):
        return {(node.asname or node.name).split(".")[0]}
    if isinstance(node, ast.arg):
        return {node.arg}
    if isinstance(node, (ast.MatchAs, ast.MatchStar)):
        return {node.name} if node.name else set()
    if isinstance(node, ast.MatchMapping):
        return {node.rest} if node.rest else set()
    return set()


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _inside(function: ast.AST, target: ast.AST, kinds: tuple) -> bool:
    """Whether `target` lies within a node of one of `kinds` inside `function`."""
    return any(
        isinstance(node, kinds) and any(n is target for n in ast.walk(node))
        for node in ast.walk(function)
    )


def _exclusive(function: ast.AST, first: ast.AST, second: ast.AST) -> bool:
    """Whether one `if` holds the two nodes in opposite branches (so at most one of them runs)."""
    for node in ast.walk(function):
        if isinstance(node, ast.If):
            body = {id(n) for b in node.body for n in ast.walk(b)}
            orelse = {id(n) for b in node.orelse for n in ast.walk(b)}
            ids = (id(first), id(second))
            if (ids[0] in body and ids[1] in orelse) or (ids[0] in orelse and ids[1] in body):
                return True
    return False
