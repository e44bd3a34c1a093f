"""Data for lmlab: tokenizers (`tokenizers.py`), TFDS builders for local files (`builders.py`, the only module that
imports TensorFlow Datasets), an embedded stdlib corpus needing no files (`embedded.py`), example construction for every
objective (`examples.py`) and the resumable, host-sharded grain loader (`loader.py`); bad input raises
`errors.DataError` ("file:line: problem"). Every loader yields per-host batches as dicts of numpy arrays (B = per-host
batch, T = sequence length, P = max_predictions, pad id / special ids from the tokenizer; `segment_ids` number the
packed sequences of a row 1..n with 0 = padding, `positions` count from 0 within each segment; weights are float32, all
else int32). Encoder MLM / NSP / ELECTRA RTD: `tokens` [B,T] (after masking), `segment_ids` [B,T], `positions` [B,T],
`token_type_ids` [B,T] (sentence A = 0, B = 1), `masked_positions` [B,P], `masked_ids` [B,P] (original ids there),
`masked_weights` [B,P] (1 real, 0 padding), and for NSP `nsp_labels` [B] (0 = B follows A, 1 = B is random; HF).
Causal LM: `tokens` [B,T], `targets` [B,T] (targets[:, t] is the token after tokens[:, t]), `weights` [B,T] (0 on
padding and where the next token starts another segment), `segment_ids`, `positions`. Seq2seq and T5 span corruption:
`encoder_tokens`, `encoder_segment_ids`, `encoder_positions` [B,T_enc]; `decoder_tokens` (targets shifted right, starting
with the decoder start id = pad id), `decoder_targets`, `decoder_weights`, `decoder_segment_ids`, `decoder_positions`
[B,T_dec], and for span corruption `decoder_target_roles` [B,T_dec] (1 a dropped token, 2 a sentinel, 3 the final EOS,
0 padding). Tasks add to the encoder keys (`tokens`, `segment_ids`, `positions`, `token_type_ids`): `label` [B]
(classification, sentence pairs), `tag_labels` [B,T] + `tag_weights` [B,T] (first sub-word of each word labeled, others
weight 0), `start_positions` / `end_positions` [B] (QA; 0 = [CLS] when the answer was cut off) with `offsets` [B,T,2]
(character span of each context token, -1 elsewhere) so predictions map back to text."""
