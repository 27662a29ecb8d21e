import torch

from mme5.eval.retrieval import Ranking, pad_lists, rank


def brute_force(embeddings, queries, lists):
    ranks = []
    for q, candidates in zip(queries, lists, strict=True):
        scores = [float(embeddings[q] @ embeddings[c]) for c in candidates]
        ranks.append(1 + sum(s >= scores[0] for s in scores[1:]))
    return ranks


def test_variable_length_lists_ties_and_chunking_match_brute_force():
    torch.manual_seed(0)
    embeddings = torch.randint(-2, 3, (40, 8)).float()  # small integers: exact ties between items
    embeddings[30:] = embeddings[:10]  # and duplicated vectors under other rows
    lists = [torch.randperm(40)[: 3 + q % 9].tolist() for q in range(25)]
    queries = list(range(25))
    ranking = Ranking(torch.tensor(queries), pad_lists(lists), torch.zeros(25, dtype=torch.long))
    expected = brute_force(embeddings, queries, lists)
    for budget in (1, 100, 1 << 26):  # one query per chunk, a few, all at once
        ranked = rank(ranking, embeddings, top_k=4, budget=budget)
        assert ranked.ranks.tolist() == expected
    assert ranked.top.shape == (25, 4)
    short = lists.index(next(x for x in lists if len(x) == 3))
    assert torch.isinf(ranked.top_scores[short, 3])  # a list of 3 pads its 4th place with -inf


def test_identical_embeddings_tie_exactly_in_wide_lists():
    """Scores of equal vectors must be bit-identical wherever they sit, or the tie rule turns random."""
    torch.manual_seed(1)
    embeddings = torch.nn.functional.normalize(torch.randn(3, 4096), dim=-1)
    embeddings[2] = -embeddings[1]  # the distractor scores below the gold
    candidates = torch.tensor([[1] + [2] * 998 + [1]])  # gold (row 1) repeated at the last column
    ranked = rank(Ranking(torch.tensor([0]), candidates, torch.tensor([0])), embeddings)
    assert ranked.ranks.tolist() == [2]
    assert ranked.top_scores[0, 0] == ranked.top_scores[0, 1]


def test_pad_lists():
    assert pad_lists([[3, 1], [2], []]).tolist() == [[3, 1], [2, -1], [-1, -1]]
