"""OSPO: GRPO and Owen-Shapley Policy Optimization for generative search.

A policy rewrites a shopping request into a query, a retriever ranks a catalog with it, and the
reward is NDCG@k or recall@k. One module per concept (docs/design.md section 5 has the map,
section 4 the data flow of one step):

    interfaces     Protocols: Retriever, Reward, Segmenter, Attribution, AdvantageEstimator
    io             atomic writes (files and folders)
    config         resolvers, compose_config, validate, config_hash
    provenance     how a run was made: overrides, resolved config, commit, versions
    data/          Sample, Dataset; shop (embedded), esci, hm
    format         what counts as a well-formed query
    segmenter      completion -> players (spans) and unions
    attribution    exact Owen / Shapley, Monte-Carlo Shapley
    retriever      BM25 (bm25s), BM25+ / BM25L (rank-bm25), QueryLikelihood, TfidfCosine, Dense
    metrics        NDCG@k, recall@k, MRR
    reward         rewards of texts and of coalitions of segments
    advantage      GRPO and OSPO estimators -> per-token advantages
    loss           clipped policy-gradient loss (+ k3 KL)
    baseline       the method: estimator + loss + mu + keep_query
    policy/        Policy; sampling, logprobs, loading, saving
    rollout        rollout engines: the policy's own generate (hf) or a colocated vLLM
    step           one RL step: rollout, score, compute_credit, update (RLStep)
    module         RLModule (LightningModule): runs RLStep, logs, validates, checkpoints
    build          every config group's object, by _target_
    sft            the warm-up stage
    rl             the RL stage: `python train.py`
    evaluate       expansions and scores: `python eval.py`
    credit_html    completions coloured by segment credit
    report, faithfulness, demos, zeroshot, export   commands: `python -m ospo.<name>`
"""

__version__ = "0.1.0"
