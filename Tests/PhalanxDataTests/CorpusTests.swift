import Foundation
import PhalanxData
import PhalanxRuntime
import PhalanxTestSupport
import Testing

/// A tokenizer with more than 65536 tokens (so its token files store `UInt32`): 65281 merges,
/// each joining two bytes.
let wideTokenizer = try! BPETokenizer(merges: (0..<65281).map { BPETokenizer.Merge(Int32($0 / 256), Int32($0 % 256)) })

@Suite("Token file")
struct TokenFileTests {
    @Test("what is written reads back, at token width 2 and 4", arguments: [false, true])
    func roundTrip(wide: Bool) throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let tokenizer: any Tokenizer = wide ? wideTokenizer : ByteTokenizer()
        let top = Int32(tokenizer.vocabularySize - 1)
        let train: [Int32] = [0, 1, 255, top, 7, top - 1] + (0..<1000).map { Int32($0 % 256) }
        let validation: [Int32] = [top, 3, 0]
        let url = folder.appendingPathComponent("corpus.tokens")
        try TokenFile.write(train: train, validation: validation, tokenizer: tokenizer, to: url)

        let file = try TokenFile(contentsOf: url)
        #expect(file.vocabularySize == tokenizer.vocabularySize)
        #expect(try file.tokenizer.serialized() == tokenizer.serialized())
        #expect(Array(file.train) == train && Array(file.validation) == validation)
        #expect(file.train.count == train.count && file.train[3] == top)
        var copied = [Int32](repeating: -1, count: 5)
        copied.withUnsafeMutableBufferPointer { file.train.copy(2..<7, into: $0.baseAddress!) }
        #expect(copied == Array(train[2..<7]))

        // The header: magic, version 1, the width, then the padded tokenizer and tokens fill the file.
        let bytes = try Data(contentsOf: url)
        let width = wide ? 4 : 2
        let tokenizerBytes = try tokenizer.serialized().count
        #expect(Array(bytes.prefix(8)) == Array("PHXTOKS1".utf8))
        #expect(bytes[8] == 1 && bytes[12] == UInt8(width))
        #expect(bytes.count == (48 + tokenizerBytes + 7) / 8 * 8 + (train.count + validation.count) * width)
    }

    @Test("writing replaces the file atomically and leaves no temporary files")
    func atomicReplace() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let url = folder.appendingPathComponent("corpus.tokens")
        try TokenFile.write(train: [1, 2, 3], validation: [4], tokenizer: ByteTokenizer(), to: url)
        try TokenFile.write(train: [5, 6], validation: [], tokenizer: ByteTokenizer(), to: url)
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path) == ["corpus.tokens"])
        let file = try TokenFile(contentsOf: url)
        #expect(Array(file.train) == [5, 6] && file.validation.isEmpty)
    }

    /// A valid image (ByteTokenizer, train [1, 2, 3, 4], validation [5, 6]) changed by `edit`.
    static func corrupted(_ edit: (inout Data) -> Void) throws -> Data {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let url = folder.appendingPathComponent("valid.tokens")
        try TokenFile.write(train: [1, 2, 3, 4], validation: [5, 6], tokenizer: ByteTokenizer(), to: url)
        var data = try Data(contentsOf: url)
        edit(&data)
        return data
    }

    static func setUInt64(_ data: inout Data, _ offset: Int, _ value: UInt64) {
        for i in 0..<8 { data[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
    }

    @Test("corrupt and truncated files fail with the file's name and the problem", arguments: [
        (try corrupted { $0.removeLast() }, "truncated or corrupt"),
        (try corrupted { $0.append(0) }, "truncated or corrupt"),
        (try corrupted { $0 = $0.prefix(20) }, "too short for a token file"),
        (try corrupted { $0[0] = UInt8(ascii: "X") }, #"magic "PHXTOKS1" expected, found "XHXTOKS1""#),
        (try corrupted { $0[8] = 2 }, "version 2; this build reads version 1"),
        (try corrupted { $0[12] = 4 }, "token width 4 bytes, but a vocabulary of 256 is stored with 2"),
        (try corrupted { setUInt64(&$0, 16, 257) }, "vocabulary size 257 differs from its tokenizer's 256"),
        (try corrupted { setUInt64(&$0, 24, 1 << 62) }, "announces 4611686018427387904 train + 2 validation tokens"),
        (try corrupted { setUInt64(&$0, 40, 1 << 40) }, "exceed"),
        (try corrupted { $0[48] = UInt8(ascii: "[") }, "(its tokenizer): not a serialised tokenizer"),
        (try corrupted { $0[$0.count - 3] = 1 }, "validation token 0 is 261, outside the vocabulary 0..<256"),
    ])
    func corrupt(data: Data, expected: String) throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let url = folder.appendingPathComponent("corrupt.tokens")
        try data.write(to: url)
        #expect {
            try TokenFile(contentsOf: url)
        } throws: { error in
            "\(error)".contains(expected) && "\(error)".hasPrefix(url.path)
        }
    }

    @Test("a missing file fails with its name")
    func missing() {
        #expect { try TokenFile(contentsOf: URL(fileURLWithPath: "/nonexistent/x.tokens")) } throws: {
            "\($0)".contains("/nonexistent/x.tokens: cannot read the token file")
        }
    }
}

@Suite("Corpus preparation")
struct CorpusPreparationTests {
    @Test("the last fraction of each file's tokens is validation; the result is reproducible")
    func split() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let a = folder.appendingPathComponent("a.txt"), b = folder.appendingPathComponent("b.txt")
        let textA = syntheticText(words: 200, seed: 10), textB = syntheticText(words: 97, seed: 11)
        try Data(textA.utf8).write(to: a)
        try Data(textB.utf8).write(to: b)
        let tokenizer = BPETokenizer.train(on: textA + textB, vocabularySize: 300)
        let (tokensA, tokensB) = (tokenizer.encode(textA), tokenizer.encode(textB))
        let (heldA, heldB) = (tokensA.count / 4, tokensB.count / 4)  // floor(n * 0.25)

        var reports: [Int] = []
        let first = folder.appendingPathComponent("one.tokens"), second = folder.appendingPathComponent("two.tokens")
        let summary = try CorpusPreparation.prepare(files: [a, b], tokenizer: tokenizer, output: first, validationFraction: 0.25) { done, total in
            #expect(total == textA.utf8.count + textB.utf8.count)
            reports.append(done)
        }
        try CorpusPreparation.prepare(files: [a, b], tokenizer: tokenizer, output: second, validationFraction: 0.25)

        let file = try TokenFile(contentsOf: first)
        #expect(Array(file.train) == tokensA.dropLast(heldA) + tokensB.dropLast(heldB))
        #expect(Array(file.validation) == tokensA.suffix(heldA) + tokensB.suffix(heldB))
        #expect(file.tokenizer as? BPETokenizer == tokenizer)
        #expect(summary.files == 2 && summary.bytes == textA.utf8.count + textB.utf8.count)
        #expect(summary.trainTokens == file.train.count && summary.validationTokens == file.validation.count)
        #expect(reports == [textA.utf8.count, textA.utf8.count + textB.utf8.count])
        #expect(try Data(contentsOf: first) == Data(contentsOf: second))
    }

    @Test("validation files are held out whole: every token of the training files trains, every token of theirs validates")
    func heldOutDocuments() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let names = ["a.txt", "b.txt", "c.txt"].map { folder.appendingPathComponent($0) }
        let texts = [syntheticText(words: 120, seed: 20), syntheticText(words: 80, seed: 21), syntheticText(words: 60, seed: 22)]
        for (name, text) in zip(names, texts) { try Data(text.utf8).write(to: name) }
        let tokenizer = ByteTokenizer()
        let output = folder.appendingPathComponent("held.tokens")
        let summary = try CorpusPreparation.prepare(files: [names[0], names[2]], validationFiles: [names[1]], tokenizer: tokenizer,
                                                    output: output, validationFraction: 0.25)
        let file = try TokenFile(contentsOf: output)
        #expect(Array(file.train) == tokenizer.encode(texts[0]) + tokenizer.encode(texts[2]))
        #expect(Array(file.validation) == tokenizer.encode(texts[1]))
        #expect(summary.files == 3 && summary.bytes == texts.map(\.utf8.count).reduce(0, +))
        #expect(summary.trainTokens == file.train.count && summary.validationTokens == file.validation.count)
    }

    @Test("a file that is not UTF-8 fails with its name and offset, and leaves the old output intact")
    func invalidInput() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let good = folder.appendingPathComponent("good.txt"), bad = folder.appendingPathComponent("bad.txt")
        let output = folder.appendingPathComponent("out.tokens")
        try Data("to be, or not to be".utf8).write(to: good)
        try Data([0x61, 0xC3, 0xA9, 0x62, 0xFF, 0x63]).write(to: bad)
        try CorpusPreparation.prepare(files: [good], tokenizer: ByteTokenizer(), output: output)
        let before = try Data(contentsOf: output)

        #expect {
            try CorpusPreparation.prepare(files: [good, bad], tokenizer: ByteTokenizer(), output: output)
        } throws: {
            "\($0)".contains("\(bad.path): not valid UTF-8 (first invalid byte at offset 4)")
        }
        #expect {
            try CorpusPreparation.prepare(files: [folder.appendingPathComponent("absent.txt")], tokenizer: ByteTokenizer(), output: output)
        } throws: {
            "\($0)".contains("absent.txt: cannot read the corpus file")
        }
        #expect(try Data(contentsOf: output) == before)
        #expect(try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted() == ["bad.txt", "good.txt", "out.tokens"])
    }
}

@Suite("Batching")
struct BatchingTests {
    /// Tokens equal to their positions, so a window's values show where it was cut.
    static let positions = TokenSplit((0..<1000).map { Int32($0) })

    @Test("windows are contiguous; targets are the inputs shifted by one")
    func windows() {
        var sampler = BatchSampler(batchSize: 6, contextLength: 17, seed: 1)
        for _ in 0..<20 {
            let batch = sampler.next(from: Self.positions)
            #expect(batch.batchSize == 6 && batch.contextLength == 17)
            #expect(batch.inputs.count == 6 * 17 && batch.targets.count == 6 * 17)
            for b in 0..<6 {
                let row = batch.inputs[(b * 17)..<((b + 1) * 17)]
                #expect(Array(row) == Array(row.first!..<(row.first! + 17)))
                #expect(batch.targets[(b * 17)..<((b + 1) * 17)].elementsEqual(row.map { $0 + 1 }))
            }
        }
    }

    @Test("starts are uniform over every valid position, both ends included")
    func startsCoverRange() {
        var sampler = BatchSampler(batchSize: 8, contextLength: 5, seed: 2)
        let split = TokenSplit((0..<9).map { Int32($0) })  // Starts 0, 1, 2, 3.
        var seen = [Int](repeating: 0, count: 4)
        for _ in 0..<500 { for b in 0..<8 { seen[Int(sampler.next(from: split).inputs[b * 5])] += 1 } }
        #expect(seen.allSatisfy { abs($0 - 1000) < 150 })
    }

    @Test("the same seed gives the same batches; a restored state continues bit for bit")
    func resume() throws {
        var a = BatchSampler(batchSize: 4, contextLength: 32, seed: 42)
        var b = BatchSampler(batchSize: 4, contextLength: 32, seed: 42)
        var other = BatchSampler(batchSize: 4, contextLength: 32, seed: 43)
        #expect(a.next(from: Self.positions) == b.next(from: Self.positions))
        #expect(a.next(from: Self.positions) != other.next(from: Self.positions))

        for _ in 0..<3 { _ = a.next(from: Self.positions) }
        let saved = try JSONEncoder().encode(a)
        let uninterrupted = (0..<5).map { _ in a.next(from: Self.positions) }
        var restored = try JSONDecoder().decode(BatchSampler.self, from: saved)
        #expect((0..<5).map { _ in restored.next(from: Self.positions) } == uninterrupted)
    }

    @Test("a mapped UInt16 split gives the same batches as the same tokens in memory")
    func fileSplit() throws {
        let folder = temporaryFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        let tokens = (0..<700).map { Int32($0 * 7 % 256) }
        let url = folder.appendingPathComponent("t.tokens")
        try TokenFile.write(train: tokens, validation: [], tokenizer: ByteTokenizer(), to: url)
        let file = try TokenFile(contentsOf: url)
        var a = BatchSampler(batchSize: 3, contextLength: 50, seed: 9), b = a
        for _ in 0..<5 { #expect(a.next(from: file.train) == b.next(from: TokenSplit(tokens))) }
    }

    @Test("evaluation windows predict every covered token exactly once, in order")
    func evaluation() {
        let split = TokenSplit((0..<103).map { Int32($0) })
        let batches = Array(EvaluationBatches(split: split, contextLength: 10, batchSize: 4))
        #expect(batches.map(\.batchSize) == [4, 4, 2])
        #expect(batches.flatMap(\.targets) == (1...100).map { Int32($0) })
        #expect(batches.flatMap(\.inputs) == (0..<100).map { Int32($0) })
        #expect(EvaluationBatches(split: split, contextLength: 10, batchSize: 4).targetCount == 100)

        let capped = EvaluationBatches(split: split, contextLength: 10, batchSize: 4, maxWindows: 3)
        #expect(capped.windowCount == 3 && Array(capped).map(\.batchSize) == [3])
        #expect(Array(EvaluationBatches(split: split, contextLength: 102, batchSize: 2)).map(\.batchSize) == [1])
        #expect(Array(EvaluationBatches(split: split, contextLength: 103, batchSize: 2)).isEmpty)
    }
}
