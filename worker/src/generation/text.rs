//! A sequence's text as its tokens arrive: incremental detokenisation (a token's text is
//! the difference between decoding the recent tokens with and without it, held back while
//! it ends in an incomplete character), and stop strings (text that could still become a
//! stop string is held back; a completed one ends the sequence and is not answered).

use super::TextCodec;

/// Tokens decoded before the newest ones, for context: byte-level BPE merges and
/// `▁`-style spaces decode differently at the start of a sequence.
const CONTEXT_TOKENS: usize = 6;

/// The text of one generation.
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the tokens decoded for context.
    prefix: usize,
    /// Tokens whose text has been given out.
    read: usize,
    stops: Vec<String>,
    /// Text decoded but not yet given out (it may start a stop string).
    held: String,
}

/// What one token adds.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text to give out now (may be empty).
    Text(String),
    /// A stop string completed: the text before it, and the sequence ends.
    Stopped(String),
}

impl TextStream {
    /// A stream ending at any of `stops`.
    pub fn new(stops: Vec<String>) -> Self {
        TextStream {
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            stops,
            held: String::new(),
        }
    }

    /// Add a generated token.
    pub fn push(&mut self, codec: &TextCodec, id: u32) -> Piece {
        self.ids.push(id);
        let before = codec.decode(&self.ids[self.prefix..self.read]);
        let after = codec.decode(&self.ids[self.prefix..]);
        // An incomplete character decodes as U+FFFD: wait for the tokens that finish it.
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') {
            let new = after.get(before.len()..).unwrap_or_default();
            self.held.push_str(new);
            self.read = self.ids.len();
            self.prefix = self.read.saturating_sub(CONTEXT_TOKENS);
        }
        self.release()
    }

    /// Give out what cannot be the start of a stop string; end at a complete one.
    fn release(&mut self) -> Piece {
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return Piece::Stopped(out);
        }
        // The longest tail of the held text that begins some stop string stays held.
        let keep = self
            .stops
            .iter()
            .map(|s| partial_tail(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        Piece::Text(out)
    }

    /// The text still held when the sequence ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Bytes at the end of `text` that are a proper prefix of `stop`, on a character boundary.
fn partial_tail(text: &str, stop: &str) -> usize {
    (1..stop.len().min(text.len() + 1))
        .rev()
        .find(|n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.is_char_boundary(*n) && text[start..] == stop[..*n]
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_stop_strings_are_found_on_character_boundaries() {
        assert_eq!(partial_tail("hello wor", "world"), 3);
        assert_eq!(partial_tail("hello", "world"), 0);
        assert_eq!(partial_tail("ab", "b!"), 1);
        assert_eq!(partial_tail("é", "éa"), 2);
        assert_eq!(partial_tail("", "x"), 0);
    }
}
