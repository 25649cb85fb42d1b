// `make client` (or `npm run generate`): src/gen from the committed openapi.json, which
// `joyhub openapi` exported from the app. HUB_CLIENT_OUTPUT lets the freshness check
// (`npm run check-generated`) generate into a scratch folder and compare.
import { defineConfig } from '@hey-api/openapi-ts';

export default defineConfig({
  input: process.env.HUB_CLIENT_INPUT ?? './openapi.json',
  output: {
    path: process.env.HUB_CLIENT_OUTPUT ?? './src/gen',
    importFileExtension: '.js',
  },
  plugins: ['@hey-api/client-fetch', '@hey-api/typescript', '@hey-api/sdk'],
});
