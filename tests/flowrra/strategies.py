"""Hypothesis strategies shared by the protocol and broker tests."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import strategies as st

# Examples per property test: small by default so the unit suite stays a few seconds long;
# set FLOWRRA_TEST_EXAMPLES=2000 (say) for a thorough run.
EXAMPLES = int(os.environ.get("FLOWRRA_TEST_EXAMPLES", "50"))

_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
_scalars = (
    st.none() | st.booleans() | _ints | st.floats() | st.text(max_size=10) | st.binary(max_size=10)
)

# Anything msgpack can carry, as the decoder hands it over (maps keyed by hashables).
msgpack_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=6)
        | st.dictionaries(st.text(max_size=10) | _ints, children, max_size=6)
    ),
    max_leaves=8,
)


def mutated(samples: list[Any]) -> st.SearchStrategy[Any]:
    """A valid body with one field replaced by a random value (finds missing type checks).

    Maps get one value replaced; lists of items get one field of their first item replaced;
    other lists get one element replaced.
    """

    def mutate(sample: Any, data: st.DataObject) -> Any:
        if isinstance(sample, dict):
            key = data.draw(st.sampled_from(sorted(sample)))
            return {**sample, key: data.draw(msgpack_values)}
        if not isinstance(sample[0], list):
            index = data.draw(st.integers(0, len(sample) - 1))
            return [*sample[:index], data.draw(msgpack_values), *sample[index + 1 :]]
        inner = list(sample[0])
        index = data.draw(st.integers(0, len(inner) - 1))
        inner[index] = data.draw(msgpack_values)
        return [inner, *sample[1:]]

    return st.tuples(st.sampled_from(samples), st.data()).map(lambda t: mutate(*t))
