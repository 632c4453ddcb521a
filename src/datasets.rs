//! `kiln datasets upload|list|delete`: datasets uploaded once for many training jobs.

use std::path::Path;

use anyhow::{Context, bail};
use kiln_proto::kiln::v1 as pb;

use crate::client::status;
use crate::train::client;

/// `kiln datasets upload FILE --label COLUMN` (CSV) or `kiln datasets upload X.npy --labels
/// Y.npy`: stream the file(s) in 64 KiB chunks.
pub async fn upload(
    addr: &str,
    path: &Path,
    label: Option<&str>,
    labels_file: Option<&Path>,
    name: Option<String>,
) -> anyhow::Result<String> {
    let mut bytes =
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = kiln_core::npy::is_npy(&bytes);
    let (format, labels_size) = match (npy, labels_file) {
        (true, Some(labels_path)) => {
            let labels = std::fs::read(labels_path)
                .with_context(|| format!("cannot read {}", labels_path.display()))?;
            let size = labels.len() as u64;
            bytes.extend_from_slice(&labels);
            (pb::DatasetFormat::Npy, size)
        }
        (true, None) => bail!(
            "{} is a NumPy file: name the labels file with --labels LABELS.npy",
            path.display()
        ),
        (false, Some(_)) => bail!(
            "--labels is for NumPy .npy uploads; {} is not one (a CSV file names its label column with --label)",
            path.display()
        ),
        (false, None) if label.is_none() => {
            bail!("name the CSV file's label column with --label COLUMN")
        }
        (false, None) => (pb::DatasetFormat::Csv, 0),
    };
    let name = name.unwrap_or_else(|| {
        path.file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "_.-".contains(*c))
                    .collect()
            })
            .filter(|s: &String| !s.is_empty())
            .unwrap_or_else(|| "dataset".into())
    });
    let header = pb::UploadDatasetChunk {
        part: Some(pb::upload_dataset_chunk::Part::Header(pb::DatasetHeader {
            name,
            label_column: label.unwrap_or_default().into(),
            size_bytes: bytes.len() as u64 - labels_size,
            format: format as i32,
            labels_size_bytes: labels_size,
        })),
    };
    let chunks: Vec<pb::UploadDatasetChunk> = std::iter::once(header)
        .chain(bytes.chunks(64 * 1024).map(|c| pb::UploadDatasetChunk {
            part: Some(pb::upload_dataset_chunk::Part::Data(c.to_vec())),
        }))
        .collect();
    let d = client(addr)
        .await?
        .upload_dataset(futures::stream::iter(chunks))
        .await
        .map_err(status)?
        .into_inner();
    Ok(format!(
        "dataset {} ({}): {} rows, features {}, label {}, sha256 {}{}",
        d.id,
        d.name,
        d.rows,
        d.feature_columns.join(","),
        d.label_column,
        d.sha256,
        if d.labels_sha256.is_empty() {
            String::new()
        } else {
            format!(", labels sha256 {}", d.labels_sha256)
        }
    ))
}

/// `kiln datasets list`.
pub async fn datasets(addr: &str) -> anyhow::Result<String> {
    let list = client(addr)
        .await?
        .list_datasets(pb::ListDatasetsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .datasets;
    let mut out = format!(
        "{:<20} {:<20} {:>8} {:>8} {:<14}\n",
        "DATASET", "NAME", "ROWS", "COLUMNS", "SHA256"
    );
    for d in list {
        out.push_str(&format!(
            "{:<20} {:<20} {:>8} {:>8} {:<14}\n",
            d.id,
            d.name,
            d.rows,
            d.feature_columns.len(),
            d.sha256.get(..12).unwrap_or(&d.sha256)
        ));
    }
    Ok(out)
}

/// `kiln datasets delete ID`.
pub async fn delete_dataset(addr: &str, id: &str) -> anyhow::Result<String> {
    client(addr)
        .await?
        .delete_dataset(pb::DeleteDatasetRequest { id: id.into() })
        .await
        .map_err(status)?;
    Ok(format!("deleted dataset {id}"))
}
