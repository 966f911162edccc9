import Foundation
import PhalanxRuntime

/// A byte-level byte-pair-encoding tokenizer (GPT-2 style), trained on a corpus.
///
/// Tokens `0..<256` are the bytes; merge `i` (rank `i`) joins the adjacent tokens `left, right`
/// into the new token `256 + i`, whose bytes are `bytes(left) + bytes(right)`. So
///
///     vocabularySize = 256 + merges.count
///
/// Encoding splits the text into chunks (``PreTokenizer``: words with their leading space, digit
/// runs, punctuation runs, whitespace runs), starts each chunk as its bytes, and repeatedly merges
/// the adjacent pair of lowest rank (the leftmost when it occurs twice) until no pair has a rank.
/// Decoding concatenates token bytes, so `decode(encode(x)) == x` for every string.
///
/// Reference: Sennrich, Haddow and Birch, "Neural Machine Translation of Rare Words with Subword
/// Units" (2016); byte-level variant and pre-tokenization after Radford et al., GPT-2 (2019).
public struct BPETokenizer: Tokenizer, Codable, Equatable {
    /// One merge: the adjacent tokens `left, right` become one token. Serialised as `[left, right]`.
    public struct Merge: Hashable, Sendable, Codable {
        /// The first token of the pair.
        public var left: Int32
        /// The token that follows `left`.
        public var right: Int32

        /// The merge of `left` followed by `right`.
        public init(_ left: Int32, _ right: Int32) {
            self.left = left
            self.right = right
        }

        /// Decodes `[left, right]`.
        ///
        /// - Throws: `DecodingError` unless the value is an array of exactly two `Int32`.
        public init(from decoder: any Decoder) throws {
            var container = try decoder.unkeyedContainer()
            left = try container.decode(Int32.self)
            right = try container.decode(Int32.self)
            guard container.isAtEnd else {
                throw DecodingError.dataCorruptedError(in: container, debugDescription: "a merge is [left, right]")
            }
        }

        /// Encodes as `[left, right]`.
        public func encode(to encoder: any Encoder) throws {
            var container = encoder.unkeyedContainer()
            try container.encode(left)
            try container.encode(right)
        }

        /// Both ids in one key: `left` in the high 32 bits.
        var key: UInt64 { UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right)) }
    }

    /// The serialisation format version this code writes and reads.
    public static let version = 1

    /// The merges in rank order; merge `i` makes token `256 + i`.
    public let merges: [Merge]
    /// `tokenBytes[t]`: the bytes of token `t`.
    private let tokenBytes: [[UInt8]]
    /// Merge key -> rank.
    private let ranks: [UInt64: Int32]

    /// Always `.bpe`.
    public var kind: TokenizerKind { .bpe }
    /// `256 + merges.count`: the bytes, then one token per merge.
    public var vocabularySize: Int { 256 + merges.count }

    /// A tokenizer with the given merges; merge `i` may only join tokens below `256 + i`, and no
    /// pair may be merged twice.
    ///
    /// - Throws: `DataError` naming the first merge that breaks either rule.
    public init(merges: [Merge]) throws {
        var tokenBytes = (0..<256).map { [UInt8($0)] }
        var ranks: [UInt64: Int32] = [:]
        for (i, merge) in merges.enumerated() {
            let limit = 256 + i
            guard (0..<Int32(limit)).contains(merge.left), (0..<Int32(limit)).contains(merge.right) else {
                throw DataError("BPE merge \(i) joins [\(merge.left), \(merge.right)], but it may only use tokens 0..<\(limit)")
            }
            if let earlier = ranks[merge.key] {
                throw DataError("BPE merge \(i) repeats merge \(earlier) [\(merge.left), \(merge.right)]")
            }
            ranks[merge.key] = Int32(i)
            tokenBytes.append(tokenBytes[Int(merge.left)] + tokenBytes[Int(merge.right)])
        }
        self.merges = merges
        self.tokenBytes = tokenBytes
        self.ranks = ranks
    }

    /// Equal when the merges are (everything else is derived from them).
    public static func == (a: BPETokenizer, b: BPETokenizer) -> Bool { a.merges == b.merges }

    private enum CodingKeys: String, CodingKey { case kind, version, merges }

    /// Decodes `{"kind": "bpe", "version": 1, "merges": [[left, right], ...]}` and checks the
    /// merges as `init(merges:)` does.
    ///
    /// - Throws: `DataError` for another kind or version or an invalid merge; `DecodingError`
    ///   when a field is missing or of the wrong type.
    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let kind = try container.decode(TokenizerKind.self, forKey: .kind)
        let version = try container.decode(Int.self, forKey: .version)
        guard kind == .bpe, version == Self.version else {
            throw DataError("expected a bpe tokenizer of version \(Self.version), found \(kind.rawValue) version \(version)")
        }
        try self.init(merges: container.decode([Merge].self, forKey: .merges))
    }

    /// Encodes as `{"kind": "bpe", "version": 1, "merges": [[left, right], ...]}`.
    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(TokenizerKind.bpe, forKey: .kind)
        try container.encode(Self.version, forKey: .version)
        try container.encode(merges, forKey: .merges)
    }

    /// The bytes of `token`: the byte itself below 256, else its merge's left bytes then right
    /// bytes. `token` must be in `0 ..< vocabularySize`.
    public func bytes(of token: Int32) -> [UInt8] {
        require(token >= 0 && Int(token) < tokenBytes.count, "BPETokenizer: token \(token) is outside the vocabulary 0..<\(tokenBytes.count)")
        return tokenBytes[Int(token)]
    }

    /// The tokens of `text`: each ``PreTokenizer`` chunk merged lowest rank first (see the type's
    /// summary), each distinct chunk encoded once per call.
    public func encode(_ text: String) -> [Int32] {
        let bytes = Array(text.utf8)
        var out: [Int32] = []
        out.reserveCapacity(bytes.count / 3)
        // Text repeats its words: encode each distinct chunk once.
        var cache: [ArraySlice<UInt8>: [Int32]] = [:]
        bytes.withUnsafeBufferPointer { buffer in
            PreTokenizer.forEachChunk(in: buffer) { range in
                let chunk = bytes[range]
                if let tokens = cache[chunk] {
                    out += tokens
                } else {
                    let tokens = encodeChunk(chunk)
                    cache[chunk] = tokens
                    out += tokens
                }
            }
        }
        return out
    }

    /// Merges inside one chunk, lowest rank first, in `O(n log n)`: the tokens form a linked list,
    /// and a heap holds each adjacent pair that has a rank, keyed by (rank, position). A heap entry
    /// is stale when its position was removed or now starts a different pair; such entries are
    /// skipped. A merge made by rank `r` only ever forms pairs of rank above `r`, so popping in
    /// order reproduces "merge the lowest-ranked pair, leftmost first, until none is left".
    private func encodeChunk(_ chunk: ArraySlice<UInt8>) -> [Int32] {
        var tokens = chunk.map { Int32($0) }
        let n = tokens.count
        guard n > 1 else { return tokens }
        var next = Array(1...n)  // n marks the end.
        var previous = Array(-1..<(n - 1))  // -1 marks the start.
        var removed = [Bool](repeating: false, count: n)
        struct Candidate: Comparable {
            var rank: Int32
            var position: Int
            static func < (a: Candidate, b: Candidate) -> Bool {
                (a.rank, a.position) < (b.rank, b.position)
            }
        }
        func rank(at i: Int) -> Int32? {
            guard i >= 0, next[i] < n else { return nil }
            return ranks[Merge(tokens[i], tokens[next[i]]).key]
        }
        var heap = BinaryHeap<Candidate>()
        for i in 0..<(n - 1) {
            if let r = rank(at: i) { heap.push(Candidate(rank: r, position: i)) }
        }
        while let candidate = heap.pop() {
            let i = candidate.position
            guard !removed[i], rank(at: i) == candidate.rank else { continue }
            let j = next[i]
            tokens[i] = 256 + candidate.rank
            removed[j] = true
            next[i] = next[j]
            if next[j] < n { previous[next[j]] = i }
            if let r = rank(at: previous[i]) { heap.push(Candidate(rank: r, position: previous[i])) }
            if let r = rank(at: i) { heap.push(Candidate(rank: r, position: i)) }
        }
        var out: [Int32] = []
        var i = 0
        while i < n {
            out.append(tokens[i])
            i = next[i]
        }
        return out
    }
}

extension BPETokenizer {
    /// Learns merges from `text` until the vocabulary reaches `vocabularySize`, or earlier when no
    /// adjacent pair occurs twice (merging it would not shorten the corpus).
    ///
    /// Each step merges the most frequent adjacent pair (ties go to the smaller `(left, right)`,
    /// so training is deterministic). Pairs never cross chunk boundaries (``PreTokenizer``), so
    /// the corpus is kept as its distinct chunks with their counts, and pair counts are updated
    /// incrementally: a merge revisits only the chunks that contain the pair (an index from pair to
    /// chunks), subtracting their old pairs and adding their new ones. The most frequent pair comes
    /// from a max-heap whose stale entries are skipped when popped. Cost per merge is about the
    /// total length of the chunks that contain the pair, not the corpus size.
    ///
    /// - Parameters:
    ///   - text: the training corpus.
    ///   - vocabularySize: the target, at least 256 (256 returns a tokenizer equal to the bytes).
    ///   - progress: called after each merge with (vocabulary size so far, target).
    public static func train(on text: String, vocabularySize: Int, progress: ((Int, Int) -> Void)? = nil) -> BPETokenizer {
        require(vocabularySize >= 256, "BPETokenizer.train: vocabularySize must be at least 256 (the bytes), got \(vocabularySize)")
        require(vocabularySize <= Int(Int32.max), "BPETokenizer.train: vocabularySize \(vocabularySize) does not fit Int32 token ids")

        // Distinct chunks and how often each occurs.
        let bytes = Array(text.utf8)
        var chunkIndex: [ArraySlice<UInt8>: Int] = [:]
        var words: [[Int32]] = []
        var counts: [Int] = []
        bytes.withUnsafeBufferPointer { buffer in
            PreTokenizer.forEachChunk(in: buffer) { range in
                let chunk = bytes[range]
                if let w = chunkIndex[chunk] {
                    counts[w] += 1
                } else {
                    chunkIndex[chunk] = words.count
                    words.append(chunk.map { Int32($0) })
                    counts.append(1)
                }
            }
        }
        chunkIndex = [:]

        // Pair counts, and for each pair the chunks that (may) contain it.
        var pairCounts: [UInt64: Int] = [:]
        var chunksWithPair: [UInt64: [Int32]] = [:]
        for (w, word) in words.enumerated() where word.count > 1 {
            for i in 0..<(word.count - 1) {
                let key = Merge(word[i], word[i + 1]).key
                pairCounts[key, default: 0] += counts[w]
                chunksWithPair[key, default: []].append(Int32(w))
            }
        }
        struct Entry: Comparable {
            var count: Int
            var key: UInt64
            /// The heap pops the least element: order by count descending, then key ascending.
            static func < (a: Entry, b: Entry) -> Bool { a.count != b.count ? a.count > b.count : a.key < b.key }
        }
        var heap = BinaryHeap<Entry>()
        for (key, count) in pairCounts { heap.push(Entry(count: count, key: key)) }

        var merges: [Merge] = []
        var lastVisit = [Int](repeating: -1, count: words.count)
        var delta: [UInt64: Int] = [:]
        while 256 + merges.count < vocabularySize {
            // The most frequent pair; an entry whose count changed since it was pushed is stale.
            var best: Entry?
            while let entry = heap.pop() {
                let current = pairCounts[entry.key] ?? 0
                if current == entry.count {
                    best = entry
                    break
                }
                // Counts that grew were pushed when they grew; one that shrank is pushed now.
                if current > 0 && current < entry.count { heap.push(Entry(count: current, key: entry.key)) }
            }
            guard let best, best.count >= 2 else { break }
            let merge = Merge(Int32(truncatingIfNeeded: best.key >> 32), Int32(truncatingIfNeeded: best.key))
            let newToken = Int32(256 + merges.count)
            let step = merges.count
            merges.append(merge)

            delta.removeAll(keepingCapacity: true)
            for w32 in chunksWithPair.removeValue(forKey: best.key) ?? [] {
                let w = Int(w32)
                guard lastVisit[w] != step else { continue }
                lastVisit[w] = step
                let old = words[w]
                var new: [Int32] = []
                new.reserveCapacity(old.count)
                var i = 0
                while i < old.count {
                    if i + 1 < old.count && old[i] == merge.left && old[i + 1] == merge.right {
                        new.append(newToken)
                        i += 2
                    } else {
                        new.append(old[i])
                        i += 1
                    }
                }
                guard new.count < old.count else { continue }  // A stale index entry.
                let count = counts[w]
                for i in 0..<(old.count - 1) { delta[Merge(old[i], old[i + 1]).key, default: 0] -= count }
                for i in 0..<(new.count - 1) {
                    let key = Merge(new[i], new[i + 1]).key
                    delta[key, default: 0] += count
                    if new[i] == newToken || new[i + 1] == newToken { chunksWithPair[key, default: []].append(w32) }
                }
                words[w] = new
            }
            for (key, change) in delta where change != 0 {
                let count = pairCounts[key, default: 0] + change
                assert(count >= 0, "BPE training: pair count went negative")
                if count == 0 {
                    pairCounts.removeValue(forKey: key)
                } else {
                    pairCounts[key] = count
                    if change > 0 { heap.push(Entry(count: count, key: key)) }
                }
            }
            progress?(256 + merges.count, vocabularySize)
        }
        // Each merge joins tokens that existed before it, never repeats a pair: valid by construction.
        return try! BPETokenizer(merges: merges)
    }
}
