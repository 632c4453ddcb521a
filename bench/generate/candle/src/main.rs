//! candle-transformers' Llama on a GGUF file dequantised to FP32: time to first token for
//! a prompt of N tokens and single-stream greedy decode speed, printed as one JSON line.
//!
//! The GGUF tensors are read and dequantised with candle's own GGUF reader, renamed to
//! Hugging Face's names and the query/key rows put back in Hugging Face's order (candle's
//! Llama rotates halves, as Hugging Face does), so nothing of Kiln's import is used.
//!
//! Usage: kiln-bench-candle-generate GGUF PROMPT_TOKENS NEW_TOKENS

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

fn meta_u32(content: &gguf_file::Content, key: &str) -> Result<usize> {
    Ok(content
        .metadata
        .get(key)
        .with_context(|| format!("{key} missing"))?
        .to_u32()? as usize)
}

fn meta_f32(content: &gguf_file::Content, key: &str) -> Result<f32> {
    Ok(content
        .metadata
        .get(key)
        .with_context(|| format!("{key} missing"))?
        .to_f32()?)
}

fn hf_name(name: &str) -> Option<String> {
    let top = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_owned());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// llama.cpp interleaves each head's rotary pairs; Hugging Face keeps halves.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / heads;
    Ok(w.reshape((heads, hd / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

fn argmax(logits: &Tensor) -> Result<u32> {
    Ok(logits.squeeze(0)?.argmax(0)?.to_scalar::<u32>()?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        bail!("usage: {} GGUF PROMPT_TOKENS NEW_TOKENS", args[0]);
    }
    let prompt_tokens: usize = args[2].parse()?;
    let new_tokens: usize = args[3].parse()?;
    let device = Device::Cpu;
    let mut file = std::fs::File::open(&args[1])?;
    let content = gguf_file::Content::read(&mut file)?;
    let heads = meta_u32(&content, "llama.attention.head_count")?;
    let kv_heads = meta_u32(&content, "llama.attention.head_count_kv")?;
    let vocab = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .context("tokens missing")?
        .to_vec()?
        .len();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    let mut tensors = HashMap::new();
    let mut tied = true;
    for name in names {
        let Some(hf) = hf_name(&name) else { continue };
        tied &= hf != "lm_head.weight";
        let mut t = content.tensor(&mut file, &name, &device)?.dequantize(&device)?;
        if hf.ends_with("q_proj.weight") {
            t = unpermute(&t, heads)?;
        } else if hf.ends_with("k_proj.weight") {
            t = unpermute(&t, kv_heads)?;
        }
        tensors.insert(hf, t);
    }
    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": meta_u32(&content, "llama.embedding_length")?,
        "intermediate_size": meta_u32(&content, "llama.feed_forward_length")?,
        "vocab_size": vocab,
        "num_hidden_layers": meta_u32(&content, "llama.block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": meta_f32(&content, "llama.attention.layer_norm_rms_epsilon")?,
        "rope_theta": meta_f32(&content, "llama.rope.freq_base")?,
        "max_position_embeddings": meta_u32(&content, "llama.context_length")?,
        "tie_word_embeddings": tied,
    }))?;
    let config = config.into_config(false);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
    let model = Llama::load(vb, &config)?;
    // The same synthetic prompt as Kiln's run: ids of ordinary tokens.
    let prompt: Vec<u32> = (0..prompt_tokens as u32).map(|i| 300 + (i * 37) % 5000).collect();

    let mut cache = Cache::new(true, DType::F32, &config, &device)?;
    let start = Instant::now();
    let input = Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?;
    let mut next = argmax(&model.forward(&input, 0, &mut cache)?)?;
    let ttft = start.elapsed().as_secs_f64();
    let mut tokens = vec![next];
    let decode_start = Instant::now();
    for i in 0..new_tokens.saturating_sub(1) {
        let input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
        next = argmax(&model.forward(&input, prompt.len() + i, &mut cache)?)?;
        tokens.push(next);
    }
    let decode = decode_start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "prompt_tokens": prompt.len(),
            "new_tokens": tokens.len(),
            "ttft_s": ttft,
            "decode_tokens_per_s": (tokens.len() - 1) as f64 / decode,
            "tokens": tokens,
        })
    );
    Ok(())
}
