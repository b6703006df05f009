"""fapc.gather.rows is advanced indexing by rows, for every shape the pipeline uses."""

import pytest
import torch

from fapc.gather import rows


@pytest.mark.parametrize("table_shape", [(50,), (50, 3), (50, 2, 4)])
@pytest.mark.parametrize("index_shape", [(7,), (7, 5), (2, 3, 4), (0, 5)])
def test_rows_equals_advanced_indexing(table_shape: tuple[int, ...],
                                       index_shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(*table_shape, generator=g, dtype=torch.float64)
    index = torch.randint(0, table_shape[0], index_shape, generator=g)
    got = rows(table, index)
    assert got.shape == table[index].shape
    assert torch.equal(got, table[index])


def test_rows_rejects_out_of_range() -> None:
    with pytest.raises(IndexError):
        rows(torch.zeros(4, 3), torch.tensor([[0, 4]]))
