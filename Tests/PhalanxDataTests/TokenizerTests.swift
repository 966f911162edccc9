import Foundation
import PhalanxData
import PhalanxRuntime
import Testing

/// Characters the round-trip tests draw from: ASCII of every class, whitespace runs, control
/// bytes, 2-, 3- and 4-byte UTF-8, a combining accent and a multi-scalar emoji.
let characterPool: [String] = [
    "a", "b", "e", "t", "h", "Q", "Z", "0", "7", " ", " ", " ", "\n", "\t", "\r\n", ",", ".", "'", "!", "-",
    "\u{0}", "\u{7F}", "é", "ß", "ø", "Ж", "日", "本", "€", "🙂", "🧑‍🚀", "e\u{301}", "\u{FEFF}",
]

/// A random string of up to `maxLength` characters from ``characterPool``.
func randomString(_ generator: inout SeededGenerator, maxLength: Int) -> String {
    let length = Int(generator.next() % UInt64(maxLength + 1))
    return (0..<length).map { _ in characterPool[Int(generator.next() % UInt64(characterPool.count))] }.joined()
}

/// Word-like text: words built from a few syllables (some non-ASCII), with punctuation and
/// line breaks, so byte pairs repeat the way they do in prose.
func syntheticText(words: Int, seed: UInt64) -> String {
    let syllables = ["the", "an", "ing", "er", "qu", "ou", "ré", "stra", "ße", "日本", "lo", "vé", "🙂"]
    var generator = SeededGenerator(seed: seed)
    var text = ""
    for i in 0..<words {
        let count = 1 + Int(generator.next() % 3)
        let word = (0..<count).map { _ in syllables[Int(generator.next() % UInt64(syllables.count))] }.joined()
        text += i == 0 ? word : (generator.next() % 9 == 0 ? ",\n" : " ") + word
    }
    return text + ".\n"
}

/// The textbook encoder: per chunk, repeatedly merge every occurrence (left to right) of the
/// adjacent pair of lowest rank. The tokenizer's heap-based encoder must agree with it.
func referenceEncode(_ tokenizer: BPETokenizer, _ text: String) -> [Int32] {
    var ranks: [[Int32]: Int] = [:]
    for (i, m) in tokenizer.merges.enumerated() { ranks[[m.left, m.right]] = i }
    var out: [Int32] = []
    for chunk in PreTokenizer.chunks(of: text) {
        var tokens = chunk.utf8.map { Int32($0) }
        while tokens.count > 1 {
            let best = (0..<(tokens.count - 1)).compactMap { i in ranks[[tokens[i], tokens[i + 1]]] }.min()
            guard let best else { break }
            var merged: [Int32] = []
            var i = 0
            while i < tokens.count {
                if i + 1 < tokens.count && ranks[[tokens[i], tokens[i + 1]]] == best {
                    merged.append(Int32(256 + best))
                    i += 2
                } else {
                    merged.append(tokens[i])
                    i += 1
                }
            }
            tokens = merged
        }
        out += tokens
    }
    return out
}

/// The textbook trainer: recount every pair of every chunk before each merge, merge the most
/// frequent (ties to the smaller pair), stop when no pair occurs twice.
func referenceTrain(_ text: String, vocabularySize: Int) -> [BPETokenizer.Merge] {
    var chunkCounts: [[Int32]: Int] = [:]
    for chunk in PreTokenizer.chunks(of: text) { chunkCounts[chunk.utf8.map { Int32($0) }, default: 0] += 1 }
    var words = Array(chunkCounts)
    var merges: [BPETokenizer.Merge] = []
    while 256 + merges.count < vocabularySize {
        var pairs: [[Int32]: Int] = [:]
        for (word, count) in words where word.count > 1 {
            for i in 0..<(word.count - 1) { pairs[[word[i], word[i + 1]], default: 0] += count }
        }
        guard let best = pairs.min(by: { $0.value != $1.value ? $0.value > $1.value : $0.key.lexicographicallyPrecedes($1.key) }),
              best.value >= 2 else { break }
        let token = Int32(256 + merges.count)
        merges.append(BPETokenizer.Merge(best.key[0], best.key[1]))
        words = words.map { word, count in
            var merged: [Int32] = []
            var i = 0
            while i < word.count {
                if i + 1 < word.count && word[i] == best.key[0] && word[i + 1] == best.key[1] {
                    merged.append(token)
                    i += 2
                } else {
                    merged.append(word[i])
                    i += 1
                }
            }
            return (merged, count)
        }
    }
    return merges
}

@Suite("Byte tokenizer")
struct ByteTokenizerTests {
    @Test("encodes UTF-8 bytes and round-trips any string")
    func roundTrip() {
        let tokenizer = ByteTokenizer()
        #expect(tokenizer.vocabularySize == 256 && tokenizer.kind == .byte)
        #expect(tokenizer.encode("") == [])
        #expect(tokenizer.encode("é!") == [0xC3, 0xA9, 0x21])
        var generator = SeededGenerator(seed: 1)
        for text in ["", "hello", "🧑‍🚀 naïve 日本"] + (0..<50).map({ _ in randomString(&generator, maxLength: 40) }) {
            #expect(Array(tokenizer.decode(tokenizer.encode(text)).utf8) == Array(text.utf8))
        }
    }

    @Test("decoding invalid or cut UTF-8 gives U+FFFD instead of failing")
    func lossyDecode() {
        let tokenizer = ByteTokenizer()
        #expect(tokenizer.decode([0xC3]) == "\u{FFFD}")
        #expect(tokenizer.decode([0x41, 0xFF, 0x42]) == "A\u{FFFD}B")
        #expect(tokenizer.decode([0xF0, 0x9F, 0x99]) == "\u{FFFD}")
    }

    @Test("serialises and restores through loadTokenizer")
    func serialisation() throws {
        let restored = try loadTokenizer(from: ByteTokenizer().serialized())
        #expect(restored as? ByteTokenizer == ByteTokenizer())
    }
}

@Suite("Pre-tokenizer")
struct PreTokenizerTests {
    @Test("splits words with their leading space, digit and punctuation runs, whitespace runs")
    func chunks() {
        #expect(PreTokenizer.chunks(of: "Hi  you,\n") == ["Hi", " ", " you", ",", "\n"])
        #expect(PreTokenizer.chunks(of: "I'll pay 42 ducats!!  \n\nNow") == ["I", "'", "ll", " pay", " 42", " ducats", "!!", "  \n\n", "Now"])
        #expect(PreTokenizer.chunks(of: " naïve 日本語") == [" naïve", " 日本語"])
        #expect(PreTokenizer.chunks(of: "") == [])
    }

    @Test("the chunks tile the input")
    func tiling() {
        var generator = SeededGenerator(seed: 2)
        for _ in 0..<100 {
            let text = randomString(&generator, maxLength: 30)
            #expect(Array(PreTokenizer.chunks(of: text).joined().utf8) == Array(text.utf8))
        }
    }
}

@Suite("BPE tokenizer")
struct BPETokenizerTests {
    static let corpus = syntheticText(words: 4000, seed: 3)
    static let trained = BPETokenizer.train(on: corpus, vocabularySize: 400)

    @Test("training reaches the requested vocabulary, reports progress, and compresses the corpus")
    func reachesVocabulary() {
        var reports: [Int] = []
        let tokenizer = BPETokenizer.train(on: Self.corpus, vocabularySize: 300) { size, target in
            #expect(target == 300)
            reports.append(size)
        }
        #expect(tokenizer.vocabularySize == 300 && tokenizer.kind == .bpe)
        #expect(reports == Array(257...300))
        let tokens = Self.trained.encode(Self.corpus)
        #expect(Double(tokens.count) < 0.5 * Double(Self.corpus.utf8.count))
        #expect(tokens.allSatisfy { $0 >= 0 && Int($0) < 400 })
    }

    @Test("incremental training equals the textbook recount-everything trainer")
    func matchesReferenceTraining() {
        for seed in [20, 21] as [UInt64] {
            let text = syntheticText(words: 600, seed: seed) + " 123 4567 \n\n  !!  ?? aaaaaaa"
            #expect(BPETokenizer.train(on: text, vocabularySize: 330).merges == referenceTrain(text, vocabularySize: 330))
        }
        // Small enough that training runs out of repeated pairs.
        let small = "the then thee there 日本 日本"
        #expect(BPETokenizer.train(on: small, vocabularySize: 400).merges == referenceTrain(small, vocabularySize: 400))
        #expect(BPETokenizer.train(on: small, vocabularySize: 400).vocabularySize < 400)
    }

    @Test("training stops early when no pair repeats")
    func stopsEarly() {
        #expect(BPETokenizer.train(on: "", vocabularySize: 1000).vocabularySize == 256)
        #expect(BPETokenizer.train(on: "abcd efgh", vocabularySize: 1000).vocabularySize == 256)
        // "aaaa": (a, a) occurs 3 times; after the merge "AA" has one (A, A), which does not repeat.
        let tokenizer = BPETokenizer.train(on: "aaaa", vocabularySize: 1000)
        #expect(tokenizer.merges == [BPETokenizer.Merge(97, 97)])
        #expect(tokenizer.encode("aaaaa") == [256, 256, 97])
    }

    @Test("training is deterministic and ties go to the smaller pair")
    func deterministic() {
        #expect(BPETokenizer.train(on: Self.corpus, vocabularySize: 400) == Self.trained)
        // Chunks "ba", " ab", " ba", " ab": (b, a), (a, b) and (" ", a) occur twice, (" ", b) once.
        let tokenizer = BPETokenizer.train(on: "ba ab ba ab", vocabularySize: 257)
        #expect(tokenizer.merges == [BPETokenizer.Merge(32, 97)])
    }

    @Test("round-trips arbitrary strings, including multi-byte characters, emoji and the empty string")
    func roundTrip() {
        var generator = SeededGenerator(seed: 4)
        let texts = ["", " ", "the quest", "日本🙂 vé", Self.corpus] + (0..<200).map { _ in randomString(&generator, maxLength: 60) }
        for text in texts {
            #expect(Array(Self.trained.decode(Self.trained.encode(text)).utf8) == Array(text.utf8))
        }
    }

    @Test("encoding equals the textbook lowest-rank-first merge loop")
    func matchesReference() {
        var generator = SeededGenerator(seed: 5)
        let texts = [String(Self.corpus.prefix(3000))] + (0..<100).map { _ in randomString(&generator, maxLength: 60) }
            + (0..<50).map { syntheticText(words: 20, seed: 100 + UInt64($0)) }
        for text in texts {
            #expect(Self.trained.encode(text) == referenceEncode(Self.trained, text))
        }
    }

    @Test("saves and loads: equal tokenizer, equal encodings")
    func saveLoad() throws {
        let data = try Self.trained.serialized()
        let restored = try #require(try loadTokenizer(from: data, origin: "bpe.json") as? BPETokenizer)
        #expect(restored == Self.trained)
        #expect(restored.vocabularySize == 400)
        #expect(restored.encode(Self.corpus) == Self.trained.encode(Self.corpus))
        #expect(try JSONDecoder().decode(BPETokenizer.self, from: data) == Self.trained)
    }

    @Test("malformed serialisations fail with a message naming the source and the problem", arguments: [
        (#"{"kind":"bpe","version":1,"merges":[[97,98],[300,97]]}"#, "merge 1 joins [300, 97], but it may only use tokens 0..<257"),
        (#"{"kind":"bpe","version":1,"merges":[[97,98],[97,98]]}"#, "merge 1 repeats merge 0"),
        (#"{"kind":"bpe","version":2,"merges":[]}"#, "version 1"),
        (#"{"kind":"bpe","version":1,"merges":[[97]]}"#, "malformed bpe tokenizer"),
        (#"{"kind":"sentencepiece","version":1}"#, "not a serialised tokenizer"),
        ("nonsense", "not a serialised tokenizer"),
    ])
    func malformed(json: String, expected: String) {
        #expect {
            try loadTokenizer(from: Data(json.utf8), origin: "tok.json")
        } throws: { error in
            "\(error)".contains(expected) && "\(error)".hasPrefix("tok.json")
        }
    }
}

@Suite("Streaming decoder")
struct StreamingDecoderTests {
    @Test("holds back a character split across tokens until it is complete")
    func splitCharacters() {
        var stream = StreamingDecoder(tokenizer: ByteTokenizer())
        let pieces = ByteTokenizer().encode("é日🙂!").map { stream.append($0) }
        #expect(pieces == ["", "é", "", "", "日", "", "", "", "🙂", "!"])
        #expect(stream.finish() == "")
    }

    @Test("an unfinished character at the end becomes U+FFFD; invalid bytes are not held back")
    func invalidAndUnfinished() {
        var stream = StreamingDecoder(tokenizer: ByteTokenizer())
        #expect(stream.append(0x41) == "A")
        #expect(stream.append(0xFF) == "\u{FFFD}")
        #expect(stream.append(0xE6) == "")
        #expect(stream.finish() == "\u{FFFD}")
        #expect(stream.append(0x42) == "B")
    }

    @Test("the streamed pieces concatenate to decode(all tokens), for random bytes and BPE tokens")
    func concatenationEqualsDecode() {
        var generator = SeededGenerator(seed: 6)
        let bpe = BPETokenizer.train(on: syntheticText(words: 2000, seed: 7), vocabularySize: 320)
        for trial in 0..<200 {
            let tokenizer: any Tokenizer = trial % 2 == 0 ? ByteTokenizer() : bpe
            let tokens: [Int32] = trial % 4 < 2
                ? (0..<Int(generator.next() % 12)).map { _ in Int32(truncatingIfNeeded: [0x41, 0x80, 0xA9, 0xC3, 0xE6, 0xF0, 0x9F, 0xFF][Int(generator.next() % 8)]) }
                : tokenizer.encode(randomString(&generator, maxLength: 20))
            var stream = StreamingDecoder(tokenizer: tokenizer)
            let streamed = tokens.map { stream.append($0) }.joined() + stream.finish()
            #expect(Array(streamed.utf8) == Array(tokenizer.decode(tokens).utf8))
        }
    }
}
