"""The benchmark shapes (Hugging Face LlamaConfig fields), shared by ceiling.py and compare.py.

stories260K is also a real model in ../shared; compare.py builds random-weight models of all three shapes.
No imports: compare.py's engine workers load this too, and their start-up time and memory are measured.
"""
SHAPES = {
    "stories260K": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=512, tie_word_embeddings=True),
    "stories15M": dict(hidden_size=288, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
                       num_key_value_heads=6, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}
