//! The two QUIC-LB encryption algorithms over the plaintext block (server ID ‖ nonce): one AES
//! block when it is exactly 16 octets, otherwise the four-pass Feistel network whose round function
//! is AES-128-ECB over `expand(len, pass, half)`.
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;

/// Octets in an AES block, and the plaintext length that selects the single-pass algorithm.
pub(crate) const BLOCK_LEN: usize = 16;
/// Half of the longest plaintext block (19 octets), rounded up.
const MAX_HALF_LEN: usize = 10;

pub(crate) fn cipher(key: &[u8; 16]) -> Aes128 {
    Aes128::new(GenericArray::from_slice(key))
}

/// Encrypts `block` (server ID ‖ nonce, 5..=19 octets) in place.
pub(crate) fn encrypt(aes: &Aes128, block: &mut [u8]) {
    if block.len() == BLOCK_LEN {
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.1
        //# When the nonce length and server ID length sum to exactly 16 octets, the server
        //# MUST use a single-pass encryption algorithm.
        aes.encrypt_block(GenericArray::from_mut_slice(block));
        return;
    }
    //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2
    //# When configured with both a key, and a nonce length and server ID length that
    //# sum to any number other than 16, the server MUST follow the algorith below to
    //# encrypt the connection ID.
    let mut h = Halves::split(block);
    h.right_from_left(aes, 1);
    h.left_from_right(aes, 2);
    h.right_from_left(aes, 3);
    h.left_from_right(aes, 4);
    h.join(block);
}

/// Decrypts `block` in place. Only the first `needed` octets are guaranteed correct: when they
/// fit in the left half the fourth Feistel pass is skipped, as the draft allows a load balancer.
pub(crate) fn decrypt(aes: &Aes128, block: &mut [u8], needed: usize) {
    if block.len() == BLOCK_LEN {
        aes.decrypt_block(GenericArray::from_mut_slice(block));
        return;
    }
    let mut h = Halves::split(block);
    h.left_from_right(aes, 4);
    h.right_from_left(aes, 3);
    h.left_from_right(aes, 2);
    // left_0 holds the first len/2 octets whole (for odd lengths its last nibble is shared).
    if needed > block.len() / 2 {
        h.right_from_left(aes, 1);
    }
    h.join(block);
}

/// left and right halves of the plaintext block; for an odd length the middle octet is split
/// between them, its high nibble ending `left` and its low nibble starting `right`.
struct Halves {
    left: [u8; MAX_HALF_LEN],
    right: [u8; MAX_HALF_LEN],
    len: usize,
}

impl Halves {
    fn half_len(&self) -> usize {
        self.len.div_ceil(2)
    }

    fn odd(&self) -> bool {
        self.len % 2 == 1
    }

    fn split(block: &[u8]) -> Self {
        let len = block.len();
        let mut h = Halves {
            left: [0; MAX_HALF_LEN],
            right: [0; MAX_HALF_LEN],
            len,
        };
        let half = h.half_len();
        h.left[..half].copy_from_slice(&block[..half]);
        h.right[..half].copy_from_slice(&block[len - half..]);
        //= https://datatracker.ietf.org/doc/html/draft-ietf-quic-load-balancers-21#section-5.4.2.3
        //# If plaintext_len is odd, right_0 clears its first four bits,
        //# and left_0 clears its last four bits.
        h.clear_left();
        h.clear_right();
        h
    }

    fn join(&self, block: &mut [u8]) {
        let half = self.half_len();
        block[..half].copy_from_slice(&self.left[..half]);
        if self.odd() {
            block[half - 1] |= self.right[0];
            block[half..].copy_from_slice(&self.right[1..half]);
        } else {
            block[half..].copy_from_slice(&self.right[..half]);
        }
    }

    fn clear_left(&mut self) {
        if self.odd() {
            let last = self.half_len() - 1;
            self.left[last] &= 0xf0;
        }
    }

    fn clear_right(&mut self) {
        if self.odd() {
            self.right[0] &= 0x0f;
        }
    }

    fn right_from_left(&mut self, aes: &Aes128, pass: u8) {
        let mask = self.round(aes, pass, Side::Left);
        xor(&mut self.right, &mask);
        self.clear_right();
    }

    fn left_from_right(&mut self, aes: &Aes128, pass: u8) {
        let mask = self.round(aes, pass, Side::Right);
        xor(&mut self.left, &mask);
        self.clear_left();
    }

    /// `truncate(AES_ECB(key, expand(len, pass, half)), half_len)`.
    fn round(&self, aes: &Aes128, pass: u8, input: Side) -> [u8; MAX_HALF_LEN] {
        let half = self.half_len();
        let source = match input {
            Side::Left => &self.left,
            Side::Right => &self.right,
        };
        let mut block = expand(self.len as u8, pass, &source[..half]);
        aes.encrypt_block(GenericArray::from_mut_slice(&mut block));
        let mut mask = [0; MAX_HALF_LEN];
        mask[..half].copy_from_slice(&block[..half]);
        mask
    }
}

enum Side {
    Left,
    Right,
}

fn xor(target: &mut [u8; MAX_HALF_LEN], mask: &[u8; MAX_HALF_LEN]) {
    for (t, m) in target.iter_mut().zip(mask) {
        *t ^= m;
    }
}

/// `expand(length, pass, input_bytes)`: the input in the most significant octets, zero padding,
/// then the plaintext length and the pass number as the last two octets.
fn expand(len: u8, pass: u8, input: &[u8]) -> [u8; BLOCK_LEN] {
    let mut block = [0; BLOCK_LEN];
    block[..input.len()].copy_from_slice(input);
    block[14] = len;
    block[15] = pass;
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    #[test]
    fn expand_matches_the_drafts_example() {
        // draft-ietf-quic-load-balancers-21 §5.4.2.2:
        // expand(0x06, 0x02, 0xaaba3c) = 0xaaba3c00000000000000000000000602
        assert_eq!(
            expand(6, 2, &unhex("aaba3c")).to_vec(),
            unhex("aaba3c00000000000000000000000602")
        );
    }

    #[test]
    fn odd_length_split_matches_the_drafts_example() {
        // §5.4.2.3 step 2: 0x7040b81b55ccf3 splits into 0x7040b810 and 0x0b55ccf3.
        let h = Halves::split(&unhex("7040b81b55ccf3"));
        assert_eq!(h.left[..4], unhex("7040b810")[..]);
        assert_eq!(h.right[..4], unhex("0b55ccf3")[..]);
        let mut joined = [0; 7];
        h.join(&mut joined);
        assert_eq!(joined.to_vec(), unhex("7040b81b55ccf3"));
    }

    #[test]
    fn four_pass_encryption_example_step_by_step() {
        // §5.4.2.4 "Encryption Example". The draft's step 10 prints the AES output as
        // 0xb334357c… but XORs 0xb3e4357c…; the final CID (0x0767947d29be054a) follows the XOR.
        let aes = cipher(
            &unhex("fdf726a9893ec05c0632d3956680baf0")
                .try_into()
                .unwrap(),
        );
        let mut h = Halves::split(&unhex("31441a9c69c275"));
        assert_eq!(h.left[..4], unhex("31441a90")[..]);
        assert_eq!(h.right[..4], unhex("0c69c275")[..]);
        h.right_from_left(&aes, 1);
        assert_eq!(h.right[..4], unhex("0e3c1ff9")[..], "right_1");
        h.left_from_right(&aes, 2);
        assert_eq!(h.left[..4], unhex("d4a04850")[..], "left_1");
        h.right_from_left(&aes, 3);
        assert_eq!(h.right[..4], unhex("09be054a")[..], "right_2");
        h.left_from_right(&aes, 4);
        assert_eq!(h.left[..4], unhex("67947d20")[..], "left_2");
        let mut block = [0; 7];
        h.join(&mut block);
        assert_eq!(block.to_vec(), unhex("67947d29be054a"));
        decrypt(&aes, &mut block, 7);
        assert_eq!(block.to_vec(), unhex("31441a9c69c275"));
    }
}
