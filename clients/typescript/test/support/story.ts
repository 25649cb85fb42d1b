/**
 * The stories the tests ask the hub's streaming demo tool, Story Stream, to tell (API.md §5.1;
 * `joyhub serve --demo`), and what it answers: one word per chunk, `{index, text}`, the
 * caller's words first and then its own, a full stop on the last word, which also carries the
 * tool's own count, `usage.total_tokens` = ceil(characters of text / 4) + words. Deterministic,
 * so the tests compare with literals. Imported by the Node tests and by the browser page.
 */

export interface StoryChunk {
  index: number;
  text: string;
  usage?: { total_tokens: number };
}

export interface Story {
  input: { text: string; words: number };
  words: string[];
  tokens: number;
}

/** The chunks the tool sends for `story`, in order. */
export function chunksOf(story: Story): StoryChunk[] {
  return story.words.map((text, index) =>
    index === story.words.length - 1 ? { index, text, usage: { total_tokens: story.tokens } } : { index, text },
  );
}

/** The tool's pace: it waits this long before each word. */
export const STORY_DELAY_MS = 40;

export const ADA: Story = {
  input: { text: 'Ada Lovelace', words: 8 },
  words: ['Ada ', 'Lovelace ', 'once ', 'upon ', 'a ', 'time ', 'a ', 'small.'],
  tokens: 3 + 8,
};

export const GRACE: Story = {
  input: { text: 'Grace Hopper', words: 20 },
  words: 'Grace Hopper once upon a time a small hub carried every token of every tool to the people who asked.'
    .split(/(?<= )/),
  tokens: 3 + 20,
};
