"""ctcflow: the domain code shared by the DVC stages (stages/) and the Prefect flows (pipeline/).

audio        read headers and samples (soundfile), resample; AudioError with a reason code
checkpoint   save and load checkpoints (weights_only), rebuild their model and tokenizer
data         the feature store (one array and index per split), padding masks, length batching
decoding     greedy and flashlight beam-search decoding, decode-time blank penalty, word timings
distributed  distributed data parallel: launch, join, collectives
errors       CtcflowError and Rejected, the errors a stage reports in one line
espeak       speech synthesis with the bundled libespeak-ng, for the demo corpus
features     log-mel, precomputed feature arrays, normalization statistics, SpecAugment
inference    one pass of a model over a split: losses, blank ratio, transcripts
lm           lexicon and Kneser-Ney word n-gram LM (ARPA) for beam search
losses       CTC loss, blank penalties and their running means
manifest     the manifest's rows and rejects, read and written as JSON lines
metrics      WER, CER and sentence accuracy (jiwer)
model        the acoustic models (recipe, bilstm) and build_model
params       load and validate one section of params.yaml
sources      one reader per corpus layout (demo, LibriSpeech, Common Voice, LJSpeech, tables)
text         text normalization and the tokenizer (characters or words ↔ class ids)
transcribe   transcribe audio files of any length with a checkpoint
workers      an ordered map over files in worker processes
"""

__version__ = "0.1.0"
