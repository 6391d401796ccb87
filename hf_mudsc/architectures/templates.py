"""Small builders shared by the adapters: a transformer block is the same four groups everywhere.

They only name tensors; they know nothing about matching.
"""

from __future__ import annotations

from hf_mudsc.spec import Group, HookPoint, Member


def out_rows(*params: str) -> list[Member]:
    """Tensors whose first axis produces the units (weight rows, biases, norm parameters)."""
    return [Member(p, 0, "out") for p in params]


def in_cols(*weights: str) -> list[Member]:
    """Linear weights whose columns consume the units."""
    return [Member(w, 1, "in") for w in weights]


def linear_out(prefix: str, bias: bool = True) -> list[Member]:
    return out_rows(f"{prefix}.weight", *([f"{prefix}.bias"] if bias else []))


def norm(prefix: str, bias: bool = True) -> list[Member]:
    return out_rows(f"{prefix}.weight", *([f"{prefix}.bias"] if bias else []))


def attention_groups(
    block: str,
    *,
    query: str,
    key: str,
    value: str,
    output: str,
    width: int,
    num_heads: int,
    mask: str | None = None,
) -> list[Group]:
    """The q/k group (read at the key projection output) and the v group (read at the output projection input).

    Both share a head tie, so one head pairing serves the attention pattern and the values it mixes.
    """
    qk = Group(
        name=f"{block}.qk",
        width=width,
        members=tuple(linear_out(query) + linear_out(key)),
        hooks=(HookPoint(key, "output", mask=mask),),
        num_heads=num_heads,
        head_tie=block,
    )
    v = Group(
        name=f"{block}.v",
        width=width,
        members=tuple(linear_out(value) + in_cols(f"{output}.weight")),
        hooks=(HookPoint(output, "input", mask=mask),),
        num_heads=num_heads,
        head_tie=block,
    )
    return [qk, v]


def mlp_group(block: str, *, up: str, down: str, width: int, mask: str | None = None) -> Group:
    """The MLP hidden layer, read at the input of the second linear (post-activation)."""
    return Group(
        name=f"{block}.mlp",
        width=width,
        members=tuple(linear_out(up) + in_cols(f"{down}.weight")),
        hooks=(HookPoint(down, "input", mask=mask),),
    )
