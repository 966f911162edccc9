import Foundation
import PhalanxData
import PhalanxModels
import PhalanxTraining
import Testing

@Suite("A file of prompts: parsed line by line, completed together, each as it would be alone")
struct BatchGenerationTests {
    @Test("plain lines unescape \\n and \\\\; JSON lines carry their own settings; empty lines are skipped")
    func parsing() throws {
        let text = #"first\nline"# + "\n\n" + #"{"prompt": "second", "max_tokens": 3, "stop": "x", "seed": 9}"# + "\n" + #"back\\slash"#
        let prompts = try BatchGeneration.prompts(in: text)
        #expect(prompts == [.init(prompt: "first\nline"), .init(prompt: "second", maxTokens: 3, stop: "x", seed: 9),
                            .init(prompt: "back\\slash")])
    }

    @Test("an unreadable JSON line or a budget below 1 is refused, naming the line", arguments: [
        #"{"prompt": 3}"#, #"{"text": "a"}"#, #"{"prompt": "a", "max_tokens": 0}"#,
    ])
    func refused(line: String) {
        #expect { try BatchGeneration.prompts(in: "fine\n" + line) } throws: { error in
            "\(error)".contains("prompts line 2")
        }
    }

    @Test("batches of 2 give each prompt the completion it gets in a batch of its own; stops cut the text")
    func batchesEqualSingles() throws {
        let model = try LanguageModel(tinyConfiguration(), seed: 31)
        let tokenizer = ByteTokenizer()
        let prompts: [BatchGeneration.Prompt] = [
            .init(prompt: "one two"), .init(prompt: "", maxTokens: 4), .init(prompt: "three four five six seven", stop: "e"),
            .init(prompt: "x", seed: 5),
        ]
        let defaults = BatchGeneration.Defaults(maxTokens: 12, stop: nil, temperature: 0.9, topK: 0, topP: 1, seed: 3)
        func complete(batchSize: Int) throws -> [BatchGeneration.Completion] {
            var all: [BatchGeneration.Completion] = []
            try BatchGeneration.run(prompts, model: model, tokenizer: tokenizer, defaults: defaults, batchSize: batchSize) { all += $0 }
            return all
        }
        let together = try complete(batchSize: 2), alone = try complete(batchSize: 1)
        #expect(together == alone)
        #expect(together.map(\.index) == [0, 1, 2, 3])
        #expect(together[1].tokens == 4 && together[1].finish == "length")
        for completion in together where completion.finish == "stop" { #expect(!completion.completion.contains("e")) }
    }
}
