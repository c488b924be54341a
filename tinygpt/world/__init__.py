"""The synthetic world: a TinyStories-like story generator, instruction tasks, and an oracle that knows the truth.

    lexicon.py   the world's words, by class
    stories.py   the story grammar: StorySpec -> Story (text plus the metadata it was built from)
    oracle.py    grammar, consistency, rudeness, exact answers, novelty: the world's grader
    tasks.py     instruction task families with exact answers; chat demonstrations; grade()
    split.py     the Task 1 split (test iff i % 10 in {1, 3, 7}) and the train/test text dedupe
    labeler.py   simulated labelers that rank completions (oracle utility + noise, ~73% agreement)
    export.py    writes the world to disk (JSONL and `datasets` directories)

The world imports nothing from the rest of tinygpt: every other layer may import it.
"""
