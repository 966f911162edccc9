import Foundation
import PhalanxRuntime

/// Turns text files into a ``TokenFile``.
public enum CorpusPreparation {
    /// What ``prepare(files:validationFiles:tokenizer:output:validationFraction:progress:)`` wrote.
    public struct Summary: Sendable, Equatable {
        /// Input files read.
        public var files: Int
        /// UTF-8 bytes read.
        public var bytes: Int
        /// Tokens written to the train split.
        public var trainTokens: Int
        /// Tokens written to the validation split.
        public var validationTokens: Int
    }

    /// Tokenizes `files` and writes their tokens to `output` (atomically; see ``TokenFile``).
    ///
    /// The split is per file and positional: of a file's `n` tokens, the last
    /// `floor(n * validationFraction)` go to validation and the rest to training. Splitting at
    /// the end rather than at random keeps the result reproducible without a seed, keeps each
    /// validation stretch contiguous (so evaluation windows read real running text, at any context
    /// length), and splitting every file rather than the concatenation keeps every source in both
    /// splits. The train split is the files' train parts in order, then the validation split the
    /// files' validation parts in the same order. A small file may give no validation tokens.
    ///
    /// With `validationFiles`, validation is held out by document instead: every token of `files`
    /// trains and every token of `validationFiles` validates (in the order given), so the model is
    /// scored on documents it never saw (`validationFraction` is then not used).
    ///
    /// Files are encoded one at a time (whole, so the tokens equal `tokenizer.encode(text)`), and
    /// training tokens are written as they come, so memory holds one file's tokens and the
    /// validation split.
    ///
    /// - Parameters:
    ///   - files: UTF-8 text files; one that is not valid UTF-8 fails with the offset of the first bad byte.
    ///   - validationFiles: UTF-8 text files held out whole for validation; empty: a fraction of each of `files`.
    ///   - validationFraction: in `0 ..< 1`; 0.1 holds out a tenth of each file.
    ///   - progress: called after each file with (bytes read so far, total bytes).
    /// - Throws: `DataError` naming the file when an input cannot be read or is not UTF-8, or when
    ///   `output` cannot be written; `output` is then left as it was.
    @discardableResult
    public static func prepare(files: [URL], validationFiles: [URL] = [], tokenizer: any Tokenizer, output: URL,
                               validationFraction: Double = 0.1, progress: ((Int, Int) -> Void)? = nil) throws -> Summary {
        require(validationFraction >= 0 && validationFraction < 1, "CorpusPreparation: validationFraction must be in 0..<1, got \(validationFraction)")
        require(!files.isEmpty, "CorpusPreparation: no input files")
        let inputs = files + validationFiles
        var sizes: [Int] = []
        for file in inputs {
            guard let size = (try? FileManager.default.attributesOfItem(atPath: file.path))?[.size] as? Int else {
                throw DataError("\(file.path): cannot read the corpus file (does it exist?)")
            }
            sizes.append(size)
        }
        let totalBytes = sizes.reduce(0, +)

        var writer = try TokenFileWriter(url: output, tokenizer: tokenizer)
        var summary = Summary(files: inputs.count, bytes: 0, trainTokens: 0, validationTokens: 0)
        var validation: [Int32] = []
        do {
            for (index, (file, size)) in zip(inputs, sizes).enumerated() {
                let tokens = tokenizer.encode(try readText(file))
                let fraction = validationFiles.isEmpty ? validationFraction : index < files.count ? 0 : 1
                let held = Int(Double(tokens.count) * fraction)
                try writer.appendTrain(Array(tokens[..<(tokens.count - held)]))
                validation += tokens[(tokens.count - held)...]
                summary.trainTokens += tokens.count - held
                summary.bytes += size
                progress?(summary.bytes, totalBytes)
            }
            summary.validationTokens = validation.count
            try writer.finish(validation: validation)
        } catch {
            writer.abandon()
            throw error
        }
        return summary
    }

    /// The contents of a UTF-8 text file, or an error naming the file and the first invalid byte.
    static func readText(_ url: URL) throws -> String {
        let data: Data
        do {
            data = try Data(contentsOf: url)
        } catch {
            throw DataError("\(url.path): cannot read the corpus file (\(error.localizedDescription))")
        }
        if let text = String(validating: data, as: UTF8.self) { return text }
        var iterator = data.makeIterator()
        var parser = Unicode.UTF8.ForwardParser()
        var offset = 0
        while case .valid(let scalar) = parser.parseScalar(from: &iterator) { offset += scalar.count }
        throw DataError("\(url.path): not valid UTF-8 (first invalid byte at offset \(offset)); corpus files must be UTF-8 text")
    }
}
