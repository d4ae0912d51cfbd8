"""Attention functions for `passes_history_through` (tests/unit/test_callers.py), one per rule
of the proof: each rejected example is otherwise the accepted shape, so it would be proven if its
rule were dropped. They are never run; they are real `def`s of this file so that `inspect` finds
their source, and they call mlx-lm's own helper by its own name, as mlx-lm's models do.
"""

from __future__ import annotations

from mlx_lm.models.base import scaled_dot_product_attention

# ---- accepted ----------------------------------------------------------------------------------


def llama_style(self, x, mask=None, cache=None):
    queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cache is not None:
        queries = self.rope(queries, offset=cache.offset)
        keys = self.rope(keys, offset=cache.offset)
        keys, values = cache.update_and_fetch(keys, values)
    else:  # this branch never runs after the fetch: it may read the names
        queries = self.rope(queries)
        keys = self.rope(keys)
    output = scaled_dot_product_attention(
        queries, keys, values, cache=cache, scale=self.scale, mask=mask
    )
    return self.o_proj(output)


def gpt_oss_style_positional_cache(self, q, k, v, mask, cache=None):
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    v_hat = scaled_dot_product_attention(q, k, v, cache, self.sm_scale, mask=mask, sinks=self.sinks)
    return self.o_proj(v_hat)


def fetch_never_read(self, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return self.done


def list_target_fetch(q, k, v, cache):
    [keys, values] = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def loop_before_the_fetch(q, k, v, cache):
    for _ in range(2):  # a loop elsewhere: only a loop around the fetch or the call matters
        q = q * 1
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


# ---- rejected: the history is read ---------------------------------------------------------------


def reads_keys_shape_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    scale = keys.shape[-1] ** -0.5
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=scale, mask=None)


def transforms_keys_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    doubled = keys * 2
    return scaled_dot_product_attention(q, doubled, values, cache=cache, scale=1.0, mask=None)


def returns_keys(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
    return out, keys


def keys_also_as_keyword(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=keys)


def keys_and_values_swapped(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, values, keys, cache=cache, scale=1.0, mask=None)


def values_passed_as_keys(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, values, values, cache=cache, scale=1.0, mask=None)


def keys_passed_as_values(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, keys, cache=cache, scale=1.0, mask=None)


def keys_read_in_else_of_a_later_if(q, k, v, cache, flag):
    if cache is not None:
        keys, values = cache.update_and_fetch(k, v)
    if flag:
        out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
    else:  # a later `if`: this runs after the fetch
        out = values.sum()
    return out


def keys_read_later_in_the_fetchs_own_branch(q, k, v, cache):
    if cache is not None:
        keys, values = cache.update_and_fetch(k, v)
        last = keys[..., -1, :]  # the same branch: this runs after the fetch
    else:
        keys, values, last = k, v, k
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=last)


def values_read_later_in_the_fetchs_own_else_branch(q, k, v, cache):
    if cache is None:
        keys, values = k, v
    else:
        keys, values = cache.update_and_fetch(k, v)
        values.sum()
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def helper_given_an_expression_of_the_keys(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys.astype(q.dtype), values, cache=cache, scale=1.0)


def cache_passed_as_the_fifth_argument(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, None, cache)  # cache=None, scale=cache


def keys_read_in_lambda_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    width = lambda: keys.shape[-1]  # noqa: E731
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=width(), mask=None)


def helper_called_in_lambda_after(q, k, v, cache, run):
    keys, values = cache.update_and_fetch(k, v)
    return run(
        lambda: scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
    )


def helper_called_in_nested_def_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)

    def attend():
        return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)

    return attend()


def helper_called_in_comprehension_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return [
        scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
        for _ in range(1)
    ]


# ---- rejected: the fetch is not one plain pair from one plain cache ----------------------------


def fetch_not_unpacked(q, k, v, cache):
    kv = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, kv[0], kv[1], cache=cache, scale=1.0, mask=None)


def fetch_into_one_name_twice(q, k, v, cache):
    keys, keys = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, keys, cache=cache, scale=1.0, mask=None)


def fetch_receiver_is_an_attribute(self, q, k, v):
    keys, values = self.cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=self.cache, scale=1.0, mask=None)


def two_update_and_fetch_calls(q, k, v, cache, other):
    keys, values = cache.update_and_fetch(k, v)
    other.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def fetch_inside_for_loop(q, k, v, cache):
    for _ in range(1):
        keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def fetch_inside_while_loop(q, k, v, cache, pending):
    while pending:
        keys, values = cache.update_and_fetch(k, v)
        pending = False
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


# ---- rejected: the helper call is not the one plain call with the fetching cache ---------------


def helper_called_inside_loop(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    outs = []
    for _ in range(2):
        outs.append(
            scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
        )
    return outs


def helper_called_twice(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    first = scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
    second = scaled_dot_product_attention(q, keys, values, cache=cache, scale=0.5, mask=None)
    return first + second


def helper_called_with_starred_args(leading, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(*leading, keys, values, cache=cache, scale=1.0, mask=None)


def helper_called_with_double_starred_kwargs(q, k, v, cache, options):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, **options)


def helper_given_another_cache(q, k, v, cache, other):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=other, scale=1.0, mask=None)


def cache_rebound_before_helper(q, k, v, cache, other):
    keys, values = cache.update_and_fetch(k, v)
    cache = other
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def fetched_value_named_like_the_cache(q, k, v, cache):
    keys, cache = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, cache, cache=cache, scale=1.0, mask=None)


# ---- rejected: the helper's name means something else here -------------------------------------


def helper_shadowed_by_parameter(q, k, v, cache, scaled_dot_product_attention):
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def helper_shadowed_by_assignment(q, k, v, cache, other_attention):
    scaled_dot_product_attention = other_attention
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def helper_shadowed_by_local_import(q, k, v, cache):
    from mlx_lm.models.base import scaled_dot_product_attention

    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


# ---- rejected: the names can be reached or changed some other way -------------------------------


def calls_locals(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    locals()
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def calls_vars(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    vars()
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def calls_eval(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    eval("keys.shape")
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def calls_exec(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    exec("print(keys)")
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def keys_declared_global(q, k, v, cache):
    global keys
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def keys_rebound_by_nonlocal_in_nested_def(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)

    def replace_keys():
        nonlocal keys
        keys = None

    replace_keys()
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def keys_deleted_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    out = scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)
    del keys
    return out


def keys_augmented_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    keys += 1
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def keys_read_by_closure_defined_before(q, k, v, cache):
    def peek():
        return keys.shape

    keys, values = cache.update_and_fetch(k, v)
    peek()
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def helper_shadowed_by_local_def(q, k, v, cache):
    def scaled_dot_product_attention(q, keys, values, cache=None, scale=1.0, mask=None):
        return keys

    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def helper_shadowed_by_except_name(q, k, v, cache):
    try:
        pass
    except ValueError as scaled_dot_product_attention:  # noqa: F841
        pass
    keys, values = cache.update_and_fetch(k, v)
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)  # noqa: F823


def cache_rebound_by_import_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    import pagedkv as cache  # noqa: F811

    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def cache_rebound_by_def_after(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)

    def cache():  # noqa: F811
        return None

    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def keys_rebound_after(q, k, v, cache, other):
    keys, values = cache.update_and_fetch(k, v)
    keys = other
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def reads_its_frame(q, k, v, cache, sys):
    keys, values = cache.update_and_fetch(k, v)
    shape = sys._getframe().f_locals["keys"].shape  # noqa: F841
    return scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


def generator_yields_between(q, k, v, cache):
    keys, values = cache.update_and_fetch(k, v)
    yield None
    yield scaled_dot_product_attention(q, keys, values, cache=cache, scale=1.0, mask=None)


ACCEPTED = [
    llama_style,
    gpt_oss_style_positional_cache,
    fetch_never_read,
    list_target_fetch,
    loop_before_the_fetch,
]
REJECTED = [
    reads_keys_shape_after,
    transforms_keys_after,
    returns_keys,
    keys_also_as_keyword,
    keys_and_values_swapped,
    values_passed_as_keys,
    keys_passed_as_values,
    keys_read_in_else_of_a_later_if,
    helper_given_an_expression_of_the_keys,
    cache_passed_as_the_fifth_argument,
    keys_read_later_in_the_fetchs_own_branch,
    values_read_later_in_the_fetchs_own_else_branch,
    keys_read_in_lambda_after,
    helper_called_in_lambda_after,
    helper_called_in_nested_def_after,
    helper_called_in_comprehension_after,
    fetch_not_unpacked,
    fetch_into_one_name_twice,
    fetch_receiver_is_an_attribute,
    two_update_and_fetch_calls,
    fetch_inside_for_loop,
    fetch_inside_while_loop,
    helper_called_inside_loop,
    helper_called_twice,
    helper_called_with_starred_args,
    helper_called_with_double_starred_kwargs,
    helper_given_another_cache,
    cache_rebound_before_helper,
    fetched_value_named_like_the_cache,
    helper_shadowed_by_parameter,
    helper_shadowed_by_assignment,
    helper_shadowed_by_local_import,
    calls_locals,
    calls_vars,
    calls_eval,
    calls_exec,
    keys_declared_global,
    keys_rebound_by_nonlocal_in_nested_def,
    keys_deleted_after,
    keys_augmented_after,
    keys_read_by_closure_defined_before,
    helper_shadowed_by_local_def,
    helper_shadowed_by_except_name,
    cache_rebound_by_import_after,
    cache_rebound_by_def_after,
    keys_rebound_after,
    reads_its_frame,
    generator_yields_between,
]
