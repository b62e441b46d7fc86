"""``make paper``: every table of the paper in miniature, over several worlds (docs/paper.md).

``tables`` declares the tables (arms, metrics, claims); ``plan`` turns them into runs per world; ``scoring`` reads
the runs' metrics and judges each claim over the worlds; ``ceilings`` measures what the teachers let the frozen
LLM answer; ``report`` writes the results; ``cli`` drives it all (``python -m lavis_pformer.demo.paper``).
"""
