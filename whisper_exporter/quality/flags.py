"""What a reviewer can flag a production sample as (the verified record's `flags`); no imports, so the
runtime's counters can name them without loading the quality modules."""

# A flagged item is never scored as WER; "no_speech" on a transcript with text is a confirmed hallucination.
FLAGS = ("no_speech", "unintelligible", "wrong_language", "personal_data")
