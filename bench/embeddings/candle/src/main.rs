//! all-MiniLM-L6-v2 in candle-transformers: sentence embeddings (mean pooling, L2) of the
//! benchmark's texts at batch 1 and 32 (the mixed texts at 32 only), timed per batch, on
//! the CPU. One JSON line per
//! cell on stdout: the peer Kiln's encoder is measured against (bench/embeddings/run.py).
//!
//! Usage: kiln-bench-candle-embeddings MODEL_DIR TEXTS_JSON SECONDS

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(args.get(1).context("MODEL_DIR")?);
    let texts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(args.get(2).context("TEXTS_JSON")?)?)?;
    let seconds: f64 = args.get(3).map_or(Ok(5.0), |s| s.parse())?;
    let device = Device::Cpu;
    let config: Config = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
    let weights = std::fs::read(dir.join("model.safetensors"))?;
    let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)?;
    let model = BertModel::load(vb, &config)?;
    let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: 256, ..Default::default() }))
        .map_err(anyhow::Error::msg)?;
    for kind in ["short", "passage", "mixed"] {
        let pool: Vec<String> = texts[kind]
            .as_array()
            .context("texts")?
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        let batches: &[usize] = if kind == "mixed" { &[32] } else { &[1, 32] };
        for &batch in batches {
            let mut latencies = Vec::new();
            let mut sentences: usize;
            let mut next = 0usize;
            // Warm-up, then the measured time.
            for phase in [0.3, seconds] {
                latencies.clear();
                sentences = 0;
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs_f64(phase) {
                    let chunk: Vec<&str> = (0..batch).map(|i| pool[(next + i) % pool.len()].as_str()).collect();
                    next += batch;
                    let t0 = Instant::now();
                    embed(&model, &tokenizer, &chunk, &device)?;
                    latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                    sentences += batch;
                }
                if phase == seconds {
                    let elapsed = start.elapsed().as_secs_f64();
                    latencies.sort_by(f64::total_cmp);
                    let q = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
                    println!(
                        "{}",
                        serde_json::json!({"peer": "candle", "kind": kind, "batch": batch,
                            "sentences_per_s": sentences as f64 / elapsed,
                            "p50_ms": q(0.5), "p99_ms": q(0.99)})
                    );
                }
            }
        }
    }
    Ok(())
}

/// Tokenise, pad to the longest, run the encoder, mean-pool over real tokens, normalise.
fn embed(model: &BertModel, tokenizer: &Tokenizer, texts: &[&str], device: &Device) -> Result<Vec<Vec<f32>>> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(anyhow::Error::msg)?;
    let longest = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(1);
    let mut ids = vec![0u32; texts.len() * longest];
    let mut mask = vec![0u32; texts.len() * longest];
    for (r, e) in encodings.iter().enumerate() {
        for (c, id) in e.get_ids().iter().enumerate() {
            ids[r * longest + c] = *id;
            mask[r * longest + c] = 1;
        }
    }
    let ids = Tensor::from_vec(ids, (texts.len(), longest), device)?;
    let mask = Tensor::from_vec(mask, (texts.len(), longest), device)?;
    let types = ids.zeros_like()?;
    let states = model.forward(&ids, &types, Some(&mask))?;
    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
    let summed = states.broadcast_mul(&m)?.sum(1)?;
    let pooled = summed.broadcast_div(&m.sum(1)?)?;
    let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(pooled.broadcast_div(&norm)?.to_vec2()?)
}
