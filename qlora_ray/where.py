"""`report --where`: a filter of comparisons, parsed and evaluated here, never by `eval`.

    where_mask(df, "gpu == 'T4' and lora_r >= 8")       # a boolean Series over df's rows

The grammar is Python's expression syntax cut down to what a filter needs: comparisons of
a column with a value or another column (`==`, `!=`, `<`, `<=`, `>`, `>=`, chained ones
too), `in` / `not in` a list of values, `and`, `or`, `not`, parentheses. Anything else
(calls, attributes, subscripts, arithmetic, comprehensions, lambdas, pandas' `@` names) is
refused with the grammar in the message, so a filter string from anywhere runs no code.
"""

from __future__ import annotations

import ast
import operator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class WhereError(ValueError):
    """A `--where` filter outside the grammar, or naming a column that does not exist."""


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_WHERE_GRAMMAR = ("use comparisons of a column with a value (==, !=, <, <=, >, >=, in, not in), "
                  "joined by and / or / not, e.g. \"gpu == 'T4' and lora_r >= 8\"")


def where_mask(df: pd.DataFrame, where: str) -> pd.Series:
    """Rows matching a `--where` filter, evaluated here from its syntax tree, never by eval.

    The grammar: comparisons of a column with a value or another column (`==`, `!=`, `<`,
    `<=`, `>`, `>=`, chained ones too), `in` / `not in` a list of values, `and`, `or`, `not`,
    parentheses. Values are strings, numbers, true/false (True/False) and None (`== None`
    keeps missing values). A row whose value is missing matches no comparison.
    """
    try:
        tree = ast.parse(where.strip(), mode="eval")
    except SyntaxError as e:
        raise WhereError(f"it is not a filter ({e.msg}); {_WHERE_GRAMMAR}") from e
    return _where(tree.body, df).fillna(False).astype(bool)


def _where(node: ast.AST, df: pd.DataFrame) -> pd.Series:
    if isinstance(node, ast.BoolOp):
        masks = [_where(v, df).fillna(False).astype(bool) for v in node.values]
        combine = operator.and_ if isinstance(node.op, ast.And) else operator.or_
        out = masks[0]
        for m in masks[1:]:
            out = combine(out, m)
        return out
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_where(node.operand, df).fillna(False).astype(bool)
    if isinstance(node, ast.Compare):
        left = _operand(node.left, df)
        masks = []
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _operand(right_node, df, allow_list=isinstance(op, (ast.In, ast.NotIn)))
            masks.append(_compare(op, left, right, df))
            left = right
        out = masks[0]
        for m in masks[1:]:
            out = out & m
        return out
    raise WhereError(f"{ast.unparse(node)!r} is not a comparison; {_WHERE_GRAMMAR}")


def _operand(node: ast.AST, df: pd.DataFrame, allow_list: bool = False) -> Any:
    if isinstance(node, ast.Name):
        if node.id in ("true", "false"):
            return node.id == "true"
        if node.id not in df.columns:
            raise WhereError(f"{node.id!r} is not a column")
        return df[node.id]
    if isinstance(node, ast.Constant) and (node.value is None or isinstance(node.value, (str, int, float))):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _operand(node.operand, df)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if allow_list and isinstance(node, (ast.List, ast.Tuple)):
        return [_operand(e, df) for e in node.elts]
    raise WhereError(f"{ast.unparse(node)!r} is not a column or a plain value; {_WHERE_GRAMMAR}")


def _compare(op: ast.cmpop, left: Any, right: Any, df: pd.DataFrame) -> pd.Series:
    import pandas as pd

    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(left, pd.Series) or not isinstance(right, list):
            raise WhereError(f"`in` needs a column on the left and a list on the right; {_WHERE_GRAMMAR}")
        if any(isinstance(v, pd.Series) for v in right):
            raise WhereError(f"`in` takes a list of values, not columns; {_WHERE_GRAMMAR}")
        hit = left.isin(right).fillna(False).astype(bool)
        return ~hit if isinstance(op, ast.NotIn) else hit
    if type(op) not in _COMPARE:
        raise WhereError(f"{type(op).__name__} is not a comparison; {_WHERE_GRAMMAR}")
    if not isinstance(left, pd.Series) and not isinstance(right, pd.Series):
        raise WhereError(f"a comparison needs a column on one side; {_WHERE_GRAMMAR}")
    if left is None or right is None:
        column = left if right is None else right
        if isinstance(op, ast.Eq):
            return column.isna()
        if isinstance(op, ast.NotEq):
            return column.notna()
        raise WhereError("None compares only with == and !=")
    result = _COMPARE[type(op)](left, right)
    return pd.Series(result, index=df.index).fillna(False).astype(bool)
